//! Issue 5's scenarios, end to end: the real controller, sender and worker
//! binaries, a private RabbitMQ node, and the local cluster named by
//! `WARREN_E2E_CLUSTER` (`make local-scenarios` on the cluster `make
//! local-up` started; `make local-e2e`, part of `make test`, runs them on a
//! cluster of its own): the chart's controller and worker Deployments in a
//! namespace per test, pods scaled by the real ReplicaSet controller (see
//! `warren_e2e::cluster`). Without `WARREN_E2E_CLUSTER` every test fails at
//! once. Besides the scaling itself they check what only a real control
//! plane decides: each scale-in victim had the lowest deletion cost, a
//! SIGKILLed worker's container is restarted by its kubelet, a deleted
//! leader pod is replaced by its Deployment.
//!
//! On the one cluster they run one at a time. Build the binaries first:
//! `cargo build --bins` (the harness fails loudly when one is missing).
//! Timing checks are lower bounds (a window is never cut short) with
//! generous upper bounds (waits are 3× longer than the scenario says,
//! `WARREN_E2E_PATIENCE`); the figures themselves are the benchmark's job
//! (`e2e-bench`).
//!
//! Scale-down windows and cooldowns are [`DATA_LAG_WINDOW`] /
//! [`DATA_LAG_COOLDOWN`] unless a scenario says otherwise: longer than the
//! management API's data lag (see `warren_e2e::base_spec`).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use warren_broker::events_log::{self, StartAt};
use warren_crd::{ConditionStatus, condition_type};
use warren_e2e::{
    DATA_LAG_COOLDOWN, DATA_LAG_WINDOW, DEPLOYMENT, Harness, HarnessError, HarnessOptions, JobKind,
    QueueKind, SCALER, deployment_object, job,
};

/// Unwraps a harness result, panicking with its Display (which carries the
/// diagnostics of a timeout).
fn ok<T>(result: Result<T, HarnessError>) -> T {
    result.unwrap_or_else(|err| panic!("{err}"))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Slack for comparing a controller's reaction with the moment something
/// happened: one polling interval plus scheduling noise.
const POLL_SLACK: f64 = 1.25;

/// Every scale-in victim that was Ready had a deletion cost no higher than
/// any Ready pod the ReplicaSet controller kept (the real controller ranked
/// the pods by the controller's marks), and at least `at_least` victims
/// were judged.
fn assert_victims_had_the_lowest_cost(h: &Harness, at_least: usize) {
    let (judged, violations) = ok(h.scale_in_cost_violations());
    println!("{judged} scale-in victims judged by deletion cost");
    assert!(
        violations.is_empty(),
        "a scale-in victim was not the pod with the lowest deletion cost: {violations:?}\n{}",
        h.diagnostics()
    );
    assert!(
        judged >= at_least,
        "{judged} Ready scale-in victims, expected at least {at_least}\n{}",
        h.diagnostics()
    );
}

fn condition(h: &Harness, type_: &str) -> Option<ConditionStatus> {
    h.scaler_status()?.condition(type_).map(|c| c.status)
}

async fn controller_counter(h: &Harness, controller: &str, metric: &str) -> f64 {
    ok(h.controller_metrics(controller).await).sum_or_zero(metric, &[])
}

/// Burst from zero: activation and scale-up to the replicas the backlog needs
/// (12 jobs / 3 per replica = 4), never more than that, every job done once,
/// the scale made through `/scale`, with a Kubernetes Event and an audit event.
#[tokio::test]
async fn burst_from_zero_activates_and_scales_to_the_needed_replicas() {
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.max_replicas = 6;
        s.messages_per_replica = 3;
    }))
    .await);

    // An empty queue keeps the target at zero.
    tokio::time::sleep(secs(3.0)).await;
    assert_eq!(h.recorder.current(), Some(0));
    assert!(h.scale_patches().is_empty(), "scaled an idle target");
    let status = ok(h
        .wait_status(secs(10.0), "a status with an observation", |s| {
            s.observation.is_some()
        })
        .await);
    assert_eq!(status.observation.map(|o| o.ready), Some(0));

    let burst = ok(h.send_burst(12, 10).await); // 12 jobs of 1 s
    let activation = ok(h
        .wait_change(
            burst.first_confirm,
            secs(10.0),
            "activation from zero",
            |c| c.from == Some(0) && c.to > 0,
        )
        .await);
    println!(
        "activation {:?} after the burst landed (0→{})",
        activation.at - burst.first_confirm,
        activation.to
    );
    ok(h.wait_replicas(4, secs(15.0)).await);
    ok(h.wait_jobs_done(&burst.ids, secs(60.0)).await);

    let (highest, _) = h
        .recorder
        .range_during(h.started, Instant::now())
        .expect("a replica history");
    assert_eq!(
        highest,
        4,
        "ceil(12 / 3) = 4, no more: {}",
        h.recorder.describe(h.started)
    );
    // Redeliveries are the scale-in scenarios' business; here every job is
    // done, once.
    let report = h.report();
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.duplicated.is_empty(), "{report:?}");
    assert!(report.interrupted.is_empty(), "{report:?}");
    assert!(!h.scale_patches().is_empty(), "no PATCH on /scale");
    assert!(
        h.other_deployment_writes().is_empty(),
        "the controller wrote the Deployment itself: {:?}",
        h.other_deployment_writes()
    );
    let events = ok(h.events().await);
    assert!(
        events.iter().any(|e| {
            let regarding = e
                .get("regarding")
                .or_else(|| e.get("involvedObject"))
                .cloned()
                .unwrap_or(Value::Null);
            regarding["name"] == SCALER || regarding["name"] == DEPLOYMENT
        }),
        "no Kubernetes Event about the scale: {events:?}"
    );
    // The audit event, read back from the events log like an operator would.
    let connection = Connection::connect(&h.node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let scaled = events_log::find(&connection, &StartAt::First, secs(5.0), |e| {
        e.routing_key == "scaler.scaled"
    })
    .await
    .expect("reading warren.events.log");
    assert!(
        scaled.is_some(),
        "no scaler.scaled event in warren.events.log"
    );
}

/// Queue drained: the scale-down waits for the stabilization window, never
/// drops below the jobs still in flight, and the step to zero waits for the
/// cooldown after the last job.
#[tokio::test]
async fn drained_queue_scales_down_after_the_window_and_to_zero_after_the_cooldown() {
    const WINDOW: f64 = DATA_LAG_WINDOW as f64;
    const COOLDOWN: f64 = DATA_LAG_COOLDOWN as f64;
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.max_replicas = 4;
        s.messages_per_replica = 1;
    }))
    .await);

    let long = ok(h.send_messages(&[job(250), job(250)]).await).ids; // 25 s each
    let short = ok(h.send_messages(&[job(5), job(5)]).await).ids; // 0.5 s each
    let at_four = ok(h.wait_replicas(4, secs(15.0)).await);
    ok(h.wait_jobs_done(&short, secs(20.0)).await);
    let short_done = h
        .job_log()
        .last_done_at(&short)
        .expect("short jobs' timestamps");

    let down = ok(h
        .wait_change(
            at_four.at,
            secs(WINDOW + 25.0),
            "a scale-down from 4",
            |c| c.from == Some(4),
        )
        .await);
    // The pods start one by one and a short job can finish while another
    // still waits: the window then holds a recommendation of 3 and the first
    // step may stop there; the step to the two in flight follows, and it is
    // the one the window is judged on (2 is recommended only once both short
    // jobs are done).
    assert!(
        down.to >= 2,
        "two long jobs are still in flight: {}",
        h.recorder.describe(h.started)
    );
    let down = ok(h
        .wait_change(
            at_four.at,
            secs(WINDOW + 25.0),
            "the scale-down to the two jobs in flight",
            |c| c.to == 2,
        )
        .await);
    let waited = (down.wall - short_done).num_milliseconds() as f64 / 1000.0;
    assert!(
        waited >= WINDOW - POLL_SLACK,
        "scaled down {waited:.2}s after the queue shrank: the {WINDOW}s window was cut short"
    );

    ok(h.wait_jobs_done(&long, secs(40.0)).await);
    let long_done = h
        .job_log()
        .last_done_at(&long)
        .expect("long jobs' timestamps");
    let zero = ok(h.wait_replicas(0, secs(COOLDOWN + 25.0)).await);
    let idle_for = (zero.wall - long_done).num_milliseconds() as f64 / 1000.0;
    assert!(
        idle_for >= COOLDOWN - POLL_SLACK,
        "went to zero {idle_for:.2}s after the last job: the {COOLDOWN}s cooldown was cut short"
    );
    for change in h.recorder.history() {
        if change.wall > at_four.wall && change.wall < long_done {
            assert!(
                change.to >= 2,
                "dropped to {} with two jobs in flight: {}",
                change.to,
                h.recorder.describe(h.started)
            );
        }
    }
    let report = h.report();
    assert!(
        report.lost.is_empty() && report.redelivered.is_empty(),
        "{report:?}"
    );
    assert!(
        h.job_log().busy_at_sigterm().is_empty(),
        "the scale-in picked busy pods: {:?}",
        h.job_log().busy_at_sigterm()
    );
    assert_victims_had_the_lowest_cost(&h, 2);
}

/// The safety rule that holds whatever the windows: never from N to 0 while
/// messages are unacked. Short windows (1 s) and cooldown (1 s) on purpose —
/// shorter than the management API's data lag, so right after the
/// activation the management counts still describe the queue before the
/// burst (empty). Two 12 s jobs run; the target must not reach zero before
/// they are done.
#[tokio::test]
async fn never_scales_to_zero_with_jobs_in_flight_even_with_short_windows() {
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.max_replicas = 2;
        s.messages_per_replica = 1;
        s.behavior.scale_down.stabilization_window_seconds = 1;
        s.behavior.cooldown_seconds = 1;
    }))
    .await);
    let burst = ok(h.send_messages(&[job(120), job(120)]).await); // 12 s each
    let up = ok(h
        .wait_change(h.started, secs(15.0), "activation", |c| c.to > 0)
        .await);
    ok(h.wait_jobs_done(&burst.ids, secs(60.0)).await);
    let done = h.job_log().last_done_at(&burst.ids).expect("timestamps");
    let early_zero: Vec<_> = h
        .recorder
        .history()
        .into_iter()
        .filter(|c| c.wall > up.wall && c.wall < done && c.to == 0)
        .collect();
    assert!(
        early_zero.is_empty(),
        "scaled to zero while jobs were in flight: {}",
        h.recorder.describe(h.started)
    );
    let report = h.report();
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(
        report.redelivered.is_empty(),
        "jobs were redelivered: {report:?}"
    );
}

/// Scale-in while long jobs run: every step removes an idle pod. Two short
/// jobs and two long ones (10 s, 25 s); once the management API shows which
/// pods are busy, maxReplicas goes 4 → 2, and once the 10 s job is done,
/// 2 → 1. The grace period is deliberately short (1 s), so a busy pod chosen
/// as a victim would be SIGKILLed and its job redelivered; beyond that, the
/// worker logs tell whether any pod got SIGTERM with a job in hand.
///
/// The scale-ins come from spec edits (bounds apply at once) rather than
/// from the drain, so that what is tested is the pod-deletion-cost marking,
/// not how long the management API takes to notice a finished job.
#[tokio::test]
async fn scale_in_while_long_jobs_run_interrupts_no_job() {
    // The scale-up to 4 is only the setup: it needs the unacked counts (with
    // them unknown, a fresh queue's jobs taken by workers look like no work),
    // so the controllers start once the management API reports the queue.
    let h = ok(Harness::start(
        HarnessOptions {
            grace_seconds: 1,
            wait_for_queue_stats: true,
            ..HarnessOptions::default()
        }
        .scaler(|s| {
            s.max_replicas = 4;
            s.messages_per_replica = 1;
        }),
    )
    .await);

    let short = ok(h.send_messages(&[job(10), job(10)]).await).ids; // 1 s
    let medium = ok(h.send_messages(&[job(100)]).await).ids; // 10 s
    let long = ok(h.send_messages(&[job(250)]).await).ids; // 25 s
    ok(h.wait_replicas(4, secs(15.0)).await);
    ok(h.wait_jobs_done(&short, secs(20.0)).await);
    let pod_of = |id: &str| {
        h.job_log()
            .of(id)
            .iter()
            .find(|e| e.kind == JobKind::Started)
            .map(|e| e.pod.clone())
            .expect("the job started")
    };
    let (medium_pod, long_pod) = (pod_of(&medium[0]), pod_of(&long[0]));

    let busy = BTreeSet::from([medium_pod.clone(), long_pod.clone()]);
    let lag = ok(h.wait_management_busy(&busy, secs(20.0)).await);
    println!("the management API showed the busy pods after another {lag:?}");
    let edited = Instant::now();
    ok(h.patch_scaler_spec(json!({"maxReplicas": 2})).await);
    ok(
        h.wait_change(edited, secs(10.0), "the scale-in to 2", |c| c.to == 2)
            .await,
    );

    ok(h.wait_jobs_done(&medium, secs(30.0)).await);
    ok(h.wait_pods_ready(2, secs(10.0)).await);
    ok(
        h.wait_management_busy(&BTreeSet::from([long_pod.clone()]), secs(20.0))
            .await,
    );
    let edited = Instant::now();
    ok(h.patch_scaler_spec(json!({"maxReplicas": 1})).await);
    ok(
        h.wait_change(edited, secs(10.0), "the scale-in to 1", |c| c.to == 1)
            .await,
    );
    ok(h.wait_jobs_done(&long, secs(40.0)).await);

    let log = h.job_log();
    assert!(
        log.busy_at_sigterm().is_empty(),
        "busy pods were chosen as scale-in victims: {:?}",
        log.busy_at_sigterm()
    );
    let report = h.report();
    assert!(
        report.redelivered.is_empty(),
        "scale-in redelivered jobs: {report:?}"
    );
    assert!(
        report.interrupted.is_empty(),
        "scale-in interrupted jobs: {report:?}"
    );
    assert!(
        report.lost.is_empty() && report.duplicated.is_empty(),
        "{report:?}"
    );
    let victims: Vec<_> = h.exits().into_iter().filter(|e| e.sigterm_sent).collect();
    assert_eq!(victims.len(), 3, "4 → 2 → 1: {victims:?}");
    for exit in victims {
        assert!(
            exit.success() && !exit.sigkill_sent,
            "a scale-in victim did not exit 0 within its grace period: {exit:?}"
        );
    }
    // The 4 → 2 step may come before some new pods pass their first
    // readiness probe (not a cost decision); the 2 → 1 step's victim is Ready.
    assert_victims_had_the_lowest_cost(&h, 1);
}

/// Scale-in when every pod is busy and a backlog waits (maxReplicas lowered
/// from 4 to 2): the victims finish the job in hand and exit 0 within the
/// grace period, and take no further job with them — no job is redelivered,
/// none is done twice. (A worker that keeps its consumer open until its job
/// is acked is handed the next message and returns it on close: a
/// redelivery caused by scale-in.)
#[tokio::test]
async fn scale_in_of_busy_workers_with_a_backlog_redelivers_nothing() {
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.max_replicas = 4;
        s.messages_per_replica = 1;
    }))
    .await);
    let burst = ok(h.send_burst(12, 20).await); // 12 jobs of 2 s
    ok(h.wait_replicas(4, secs(15.0)).await);
    ok(h.wait_in_hand(4, secs(20.0)).await);

    let edited = Instant::now();
    ok(h.patch_scaler_spec(json!({"maxReplicas": 2})).await);
    ok(
        h.wait_change(edited, secs(20.0), "the scale-in to maxReplicas 2", |c| {
            c.to == 2
        })
        .await,
    );
    ok(h.wait_jobs_done(&burst.ids, secs(60.0)).await);

    let report = h.report();
    assert!(
        report.lost.is_empty() && report.duplicated.is_empty(),
        "{report:?}"
    );
    assert!(
        report.interrupted.is_empty(),
        "scale-in interrupted jobs: {report:?}"
    );
    assert!(
        report.redelivered.is_empty(),
        "scale-in caused redeliveries: {report:?}"
    );
    let victims: Vec<_> = h.exits().into_iter().filter(|e| e.sigterm_sent).collect();
    assert!(victims.len() >= 2, "two pods were removed: {victims:?}");
    for exit in victims {
        assert!(
            exit.success() && !exit.sigkill_sent,
            "a busy victim did not finish and exit 0: {exit:?}"
        );
    }
    // The scale-in often comes before the new pods pass their first readiness
    // probe: the ReplicaSet then deletes not-Ready pods first, which is not a
    // cost decision. Any Ready victim is judged.
    assert_victims_had_the_lowest_cost(&h, 0);
}

/// A worker SIGKILLed mid-job: the broker redelivers the job, another worker
/// process completes it; nothing lost, nothing done twice. The pod is not
/// deleted: its kubelet restarts the container (restartPolicy Always) and
/// the pod is Ready again.
#[tokio::test]
async fn a_sigkilled_workers_job_completes_elsewhere() {
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        // minReplicas 2: no scale-in takes the crashed pod away once the
        // queue drains (on a cluster the test then waits for its restart).
        s.min_replicas = 2;
        s.max_replicas = 2;
        s.messages_per_replica = 1;
    }))
    .await);
    let burst = ok(h.send_messages(&[job(40), job(40)]).await); // 4 s each
    ok(h.wait_replicas(2, secs(15.0)).await);
    let in_hand = ok(h.wait_in_hand(2, secs(20.0)).await);
    let (victim, victim_job) = in_hand[0].clone();
    ok(h.kill_worker(&victim, Signal::SIGKILL));

    ok(h.wait_jobs_done(&burst.ids, secs(40.0)).await);
    let log = h.job_log();
    let finished: Vec<_> = log
        .of(&victim_job)
        .into_iter()
        .filter(|e| e.kind == JobKind::Done)
        .collect();
    assert_eq!(finished.len(), 1, "done exactly once: {finished:?}");
    assert_ne!(finished[0].pod, victim, "finished by another pod");
    assert!(finished[0].redelivered, "it was a redelivery: {finished:?}");
    let report = h.report();
    assert!(
        report.lost.is_empty() && report.duplicated.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.redelivered, vec![victim_job.clone()], "{report:?}");
    let exit = h
        .exits()
        .into_iter()
        .find(|e| e.pod == victim)
        .expect("the victim's exit");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(
        !exit.sigterm_sent,
        "the kill was ours, not a scale-in: {exit:?}"
    );
    // Not deleted: the kubelet restarts the container in the same pod
    // (restartPolicy Always) and it serves again.
    let restarts = ok(h.wait_restarted(&victim, secs(60.0)).await);
    println!("{victim} restarted by its kubelet ({restarts} restart(s)), Ready again");
}

/// Broker crash and restart: while metrics are missing the controller keeps
/// the replicas (fallback, never down, never to zero); after the restart
/// every accepted job is processed and the target scales to zero.
#[tokio::test]
async fn broker_restart_keeps_replicas_and_loses_nothing() {
    let mut h = ok(Harness::start(
        HarnessOptions {
            // A single-node quorum queue on RabbitMQ 3.10 stops confirming
            // after a SIGKILL and restart; classic queues recover.
            queue_kind: QueueKind::Classic,
            ..HarnessOptions::default()
        }
        .scaler(|s| {
            s.max_replicas = 3;
            s.messages_per_replica = 1;
            s.fallback.failure_threshold = 2;
            s.fallback.replicas = Some(2);
        }),
    )
    .await);
    let burst = ok(h.send_burst(12, 20).await); // 12 jobs of 2 s
    ok(h.wait_replicas(3, secs(15.0)).await);
    ok(h.wait_in_hand(3, secs(20.0)).await);

    let killed = Instant::now();
    ok(h.node.kill().await.map_err(HarnessError::from));
    let fallback = h
        .wait_status(secs(15.0), "the Fallback condition", |s| {
            s.condition(condition_type::FALLBACK)
                .is_some_and(|c| c.status == ConditionStatus::True)
        })
        .await;
    tokio::time::sleep(secs(2.0)).await;
    let during = h
        .recorder
        .range_during(killed, Instant::now())
        .expect("a replica history");
    ok(h.node.start_again().await.map_err(HarnessError::from));
    let restarted = Instant::now();
    println!("broker down for {:?}", restarted - killed);
    ok(fallback);
    assert_eq!(
        during.1,
        3,
        "replicas dropped while the broker was down: {}",
        h.recorder.describe(h.started)
    );

    ok(h.wait_jobs_done(&burst.ids, secs(90.0)).await);
    let report = h.report();
    assert!(
        report.lost.is_empty(),
        "jobs lost across the broker restart: {report:?}"
    );
    ok(
        h.wait_status(secs(20.0), "the Fallback condition cleared", |s| {
            s.condition(condition_type::FALLBACK)
                .is_some_and(|c| c.status == ConditionStatus::False)
        })
        .await,
    );
}

/// Editing the QueueScaler: raising maxReplicas lets it scale further at
/// once; raising messagesPerReplica makes it scale down.
#[tokio::test]
async fn editing_max_and_target_takes_effect() {
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.max_replicas = 2;
        s.messages_per_replica = 2;
    }))
    .await);
    ok(h.send_burst(40, 50).await); // 40 jobs of 5 s: wants 20 replicas
    ok(h.wait_replicas(2, secs(15.0)).await);
    tokio::time::sleep(secs(2.0)).await;
    assert_eq!(h.recorder.current(), Some(2), "held at maxReplicas 2");

    let edited = Instant::now();
    ok(h.patch_scaler_spec(json!({"maxReplicas": 6})).await);
    let up = ok(h
        .wait_change(
            edited,
            secs(6.0),
            "a scale-up after raising maxReplicas",
            |c| c.to > 2,
        )
        .await);
    println!("maxReplicas 2→6 took effect after {:?}", up.at - edited);
    ok(h.wait_replicas(6, secs(10.0)).await);

    let edited = Instant::now();
    ok(h.patch_scaler_spec(json!({"messagesPerReplica": 100}))
        .await);
    let down = ok(h
        .wait_change(
            edited,
            secs(DATA_LAG_WINDOW as f64 + 10.0),
            "a scale-down after raising messagesPerReplica",
            |c| c.to == 1,
        )
        .await);
    println!(
        "messagesPerReplica 2→100 took effect after {:?}",
        down.at - edited
    );
    assert!(ok(h.ready_count().await) > 0, "the backlog was still there");
    // The status of generation 3 that records the scale-down (a watch may
    // first deliver an earlier status of the same generation).
    let status = ok(h
        .wait_status(
            secs(5.0),
            "observedGeneration 3 with desiredReplicas 1",
            |s| s.observed_generation == Some(3) && s.desired_replicas == Some(1),
        )
        .await);
    assert_eq!(status.desired_replicas, Some(1), "{status:?}");
    let (highest, _) = h
        .recorder
        .range_during(h.started, Instant::now())
        .expect("a replica history");
    assert!(highest <= 6, "{}", h.recorder.describe(h.started));
    ok(h.purge().await);
}

/// Paused holds: a paused scaler neither wakes a target at zero nor scales a
/// drained one down; unpausing resumes.
#[tokio::test]
async fn paused_holds_the_replicas() {
    // Short windows: while paused nothing may move whatever they say, and the
    // final step to zero comes long after the jobs (the counts are fresh).
    let h = ok(Harness::start(HarnessOptions::default().scaler(|s| {
        s.paused = true;
        s.max_replicas = 4;
        s.messages_per_replica = 1;
        s.behavior.scale_down.stabilization_window_seconds = 2;
        s.behavior.cooldown_seconds = 2;
    }))
    .await);
    let burst = ok(h.send_burst(4, 20).await); // 4 jobs of 2 s
    tokio::time::sleep(secs(4.0)).await;
    assert_eq!(
        h.recorder.current(),
        Some(0),
        "a paused scaler woke the target"
    );
    assert!(h.scale_patches().is_empty());
    ok(h.wait_status(secs(5.0), "the Paused condition", |s| {
        s.condition(condition_type::PAUSED)
            .is_some_and(|c| c.status == ConditionStatus::True)
    })
    .await);

    ok(h.patch_scaler_spec(json!({"paused": false})).await);
    ok(h.wait_replicas(4, secs(10.0)).await);
    ok(h.patch_scaler_spec(json!({"paused": true})).await);
    let paused = Instant::now();
    let held = h.recorder.current().expect("replicas");
    ok(h.wait_jobs_done(&burst.ids, secs(30.0)).await);
    // Past the scale-down window and the cooldown.
    tokio::time::sleep(secs(6.0)).await;
    let changes = h.recorder.since(paused + secs(1.5));
    assert!(
        changes.is_empty() && h.recorder.current() == Some(held),
        "paused, yet replicas moved: {}",
        h.recorder.describe(h.started)
    );

    ok(h.patch_scaler_spec(json!({"paused": false})).await);
    ok(h.wait_replicas(0, secs(20.0)).await);
    assert_ne!(
        condition(&h, condition_type::PAUSED),
        Some(ConditionStatus::True)
    );
}

/// Two controller replicas: only the Lease holder scales; when its pod is
/// deleted, another controller (the follower, or the replacement pod its
/// Deployment starts) takes over and scaling continues.
#[tokio::test]
async fn two_controllers_one_leader_scales_and_the_other_takes_over() {
    let h = ok(Harness::start(
        HarnessOptions {
            controllers: 2,
            lease_duration_seconds: 3,
            lease_grace_seconds: 1,
            ..HarnessOptions::default()
        }
        .scaler(|s| {
            s.max_replicas = 4;
            s.messages_per_replica = 1;
        }),
    )
    .await);
    let names: Vec<String> = h.controller_names();
    let started = Instant::now();
    let leader = loop {
        if let Some(holder) = h.lease_holder() {
            break holder;
        }
        assert!(
            started.elapsed() < secs(15.0),
            "nobody took the Lease\n{}",
            h.diagnostics()
        );
        tokio::time::sleep(secs(0.1)).await;
    };
    assert_eq!(names.len(), 2, "two controllers: {names:?}");
    assert!(names.contains(&leader), "unknown holder {leader}");
    let follower = names.iter().find(|n| **n != leader).expect("two").clone();

    let burst = ok(h.send_burst(2, 30).await); // 2 jobs of 3 s
    ok(h.wait_replicas(2, secs(15.0)).await);
    ok(h.wait_jobs_done(&burst.ids, secs(20.0)).await);
    let patches = "warren_controller_scale_patches_total";
    assert!(controller_counter(&h, &leader, patches).await >= 1.0);
    assert_eq!(
        controller_counter(&h, &follower, patches).await,
        0.0,
        "the follower scaled"
    );
    assert_eq!(
        controller_counter(&h, &leader, "warren_controller_leader").await,
        1.0
    );
    assert_eq!(
        controller_counter(&h, &follower, "warren_controller_leader").await,
        0.0
    );

    ok(h.kill_controller(&leader).await);
    let killed = Instant::now();
    // The deleted leader's Deployment starts a replacement pod at once, and
    // either it or the follower may win the Lease: any live controller but
    // the deleted one is a takeover.
    let new_leader = loop {
        if let Some(holder) = h.lease_holder().filter(|holder| *holder != leader) {
            break holder;
        }
        assert!(
            killed.elapsed() < secs(20.0),
            "the follower never took over\n{}",
            h.diagnostics()
        );
        tokio::time::sleep(secs(0.1)).await;
    };
    assert!(
        h.controller_names().contains(&new_leader),
        "{new_leader} holds the Lease but is no live controller pod: {:?}",
        h.controller_names()
    );
    println!(
        "{new_leader} took the Lease {:?} after {leader} was killed (follower: {follower})",
        killed.elapsed()
    );

    let sent = Instant::now();
    // 8 jobs of 3 s: at least 6 wait whatever runs, so maxReplicas 4 is
    // wanted from the instant count alone (the management API lags).
    let burst = ok(h.send_burst(8, 30).await);
    ok(
        h.wait_change(sent, secs(15.0), "the new leader scaling up", |c| c.to == 4)
            .await,
    );
    ok(h.wait_jobs_done(&burst.ids, secs(20.0)).await);
    assert!(controller_counter(&h, &new_leader, patches).await >= 1.0);
    assert_eq!(
        controller_counter(&h, &new_leader, "warren_controller_leader").await,
        1.0
    );
    let report = h.report();
    assert!(report.lost.is_empty(), "{report:?}");
    // The deleted leader's Deployment brought the count back to two.
    let deleted = Instant::now();
    while h.controller_names().len() != 2 || h.controller_names().contains(&leader) {
        assert!(
            deleted.elapsed() < secs(120.0),
            "no replacement controller pod: {:?}\n{}",
            h.controller_names(),
            h.diagnostics()
        );
        tokio::time::sleep(secs(0.5)).await;
    }
}

/// One management-API listing per broker/vhost per tick serves every scaler
/// on it: three scalers, one `GET /api/queues/<vhost>` per second, counted by
/// a proxy in front of the management port.
#[tokio::test]
async fn one_management_request_per_tick_serves_every_scaler_on_a_vhost() {
    const SCALERS: usize = 3;
    let h = ok(Harness::start(HarnessOptions {
        count_management_requests: true,
        ..HarnessOptions::default()
    })
    .await);
    let connection = lapin::Connection::connect(&h.node.amqp_url(), Default::default())
        .await
        .expect("AMQP connection");
    let channel = connection.create_channel().await.expect("channel");
    let mut names = BTreeSet::new();
    for i in 1..SCALERS {
        let name = format!("extra-{i}");
        let queue = format!("{}-{name}", h.queue);
        channel
            .queue_declare(
                queue.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .expect("declare");
        ok(h.put_deployment(deployment_object(&name, 0, 30)).await);
        let mut spec = h.default_spec();
        spec.queue.name = queue;
        spec.scale_target_ref.name = name.clone();
        ok(h.put_scaler(&name, spec).await);
        names.insert(name);
    }
    // Every scaler has been reconciled at least once.
    let started = Instant::now();
    loop {
        let observed = h
            .scalers()
            .iter()
            .filter(|o| o.pointer("/status/observation").is_some())
            .count();
        if observed == SCALERS {
            break;
        }
        assert!(
            started.elapsed() < secs(15.0),
            "{observed} of {SCALERS} scalers observed\n{}",
            h.diagnostics()
        );
        tokio::time::sleep(secs(0.2)).await;
    }
    let proxy = h.proxy.as_ref().expect("proxy");
    proxy.reset();
    const TICKS: f64 = 6.0;
    tokio::time::sleep(secs(TICKS)).await;
    let counts = proxy.counts();
    let listings: u64 = counts
        .iter()
        .filter(|(k, _)| k.starts_with("GET /api/queues/"))
        .map(|(_, v)| *v)
        .sum();
    println!("{TICKS} s with {SCALERS} scalers: {counts:?}");
    assert!(listings >= 1, "no listing at all: {counts:?}");
    assert!(
        (listings as f64) <= TICKS * 1.5 + 1.0,
        "{listings} queue listings in {TICKS} ticks for {SCALERS} scalers on one vhost: not shared ({counts:?})"
    );
}

//! Decisions per second of `warren_scaling::decide` on a realistic mix of
//! inputs and a history as long as the default 300 s window at a 2 s poll.
//!
//!     cargo run --release -p warren-scaling --example decide_bench

use std::hint::black_box;
use std::time::Instant;

use chrono::{TimeDelta, Utc};
use warren_crd::{Observation, QueueScalerSpec};
use warren_scaling::{DecisionInput, History, decide};

fn main() -> Result<(), serde_json::Error> {
    let spec: QueueScalerSpec = serde_json::from_value(serde_json::json!({
        "scaleTargetRef": {"name": "warren-worker"},
        "queue": {"name": "tasks"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 50,
        "targetDrainSeconds": 60
    }))?;
    let now = Utc::now();

    // 150 recommendations (300 s at a 2 s poll) and a few scale events.
    let history = (0..150).fold(History::new(), |h, i| {
        h.with_recommendation(now - TimeDelta::seconds(300 - 2 * i), (i % 40) as i32)
    });
    let history = (0..5).fold(history, |h, i| {
        h.with_scale(now - TimeDelta::seconds(3 * i), i as i32, i as i32 + 2)
    });

    let inputs: Vec<DecisionInput> = (0..1024u64)
        .map(|i| {
            let current = (i % 30) as i32;
            if i % 17 == 0 {
                DecisionInput::unavailable(current, (i % 5) as u32)
            } else {
                let observation = Observation::new(
                    (i * 37) % 900,
                    i % 7,
                    (i % 30).saturating_sub(1),
                    Some((i % 13) as f64),
                    Some((i % 11) as f64 * 1.5),
                    now,
                );
                DecisionInput::observed(current, observation)
            }
        })
        .collect();

    let rounds = 2_000;
    let started = Instant::now();
    let mut checksum = 0i64;
    for _ in 0..rounds {
        for input in &inputs {
            let decision = decide(black_box(&spec), black_box(input), &history, now);
            checksum += i64::from(decision.replicas);
        }
    }
    let elapsed = started.elapsed();
    let decisions = rounds * inputs.len();
    println!(
        "decide: {decisions} decisions in {:.3} s = {:.0} decisions/s ({:.0} ns each; history of {} recommendations; checksum {checksum})",
        elapsed.as_secs_f64(),
        decisions as f64 / elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / decisions as f64,
        history.recommendations().len(),
    );
    Ok(())
}

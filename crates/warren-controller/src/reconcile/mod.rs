//! The QueueScaler reconciler and the kube runtime `Controller` that drives it.
//!
//! One reconcile ([`reconcile`]) loads the scaler's memory ([`context`]),
//! runs these steps and commits the memory once at the end:
//! 1. `spec.validate()`; on error `Ready=False/InvalidSpec`, a Warning
//!    Event (once per distinct error) and a slow requeue — never a crash loop.
//! 2. The target's (Deployment or StatefulSet) current replicas and pod
//!    selector ([`target`]), from the controller's watch cache of
//!    Deployments and StatefulSets ([`Context::read_targets_from`]): no
//!    apiserver request per tick. A target the cache does not hold (not
//!    synced yet, or not there) is read with one `GET /scale`; a missing
//!    target is `Ready=False/TargetNotFound`. After its own `/scale` write
//!    the reconciler trusts the replicas it wrote until the cache shows a
//!    newer version of the target.
//! 3. **observe** ([`observe`]): unless paused, the queue observation from
//!    the [`QueueObserver`](crate::observe::QueueObserver): the ready count
//!    from an AMQP passive declare (exact, now) and the unacked count and
//!    rates from the management API (see [`crate::observe`]). A failed read
//!    increments the scaler's consecutive failures (seeded from and
//!    mirrored to `status.consecutiveFailures`). An unknown unacked count
//!    follows the rule of [`unacked`].
//!    The management API's unacked count lags the passive declare's ready
//!    count: messages that just left `ready` count as in flight until a
//!    management sample can show them ([`in_flight`]).
//! 4. **decide** ([`decide`]): [`warren_scaling::decide`] with the scaler's
//!    history, and the guard of [`unacked`]: with the unacked count unknown,
//!    a running target is never scaled to zero.
//! 5. **apply** ([`apply`]): when the decision differs from the current
//!    replicas: before a scale-in of a Deployment, pod-deletion-cost
//!    annotations on its pods (busy pods expensive, idle ones cheap); then a
//!    merge patch of `/scale`, a `Scaled` Event and a `scaler.scaled` audit
//!    event.
//! 6. **status** ([`status`]): a merge patch of `/status`, skipped when only
//!    timestamps would change. The status is built on the one this
//!    controller last wrote for the object (the watch cache can lag its own
//!    writes), else the object's.
//! 7. Requeue so that the next tick starts `pollingIntervalSeconds` after
//!    this one started ([`next_tick`]), not after it ended.
//!
//! Every reconcile runs in a `reconcile` span with `scaler =
//! namespace/name`; the log lines inside inherit it.
//!
//! The QueueScaler watch only triggers on generation changes (status writes
//! do not re-trigger), and Deployments / StatefulSets map to the scalers
//! whose `scaleTargetRef` names them, through the controller's reflector
//! store, so a scaler reacts at once when its target's replicas change
//! ([`run`]).

mod apply;
mod context;
mod decide;
pub mod in_flight;
mod observe;
mod run;
pub mod status;
mod target;
pub mod unacked;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use warren_crd::{QueueScaler, QueueScalerStatus};

use self::apply::{Plan, Target, record_event};
pub use self::context::{CONTROLLER_NAME, Context, Settings};
use self::context::{Memory, ScalerKey};
use self::observe::Observed;
pub use self::run::{run, scalers_targeting};
use self::status::{REASON_INVALID_SPEC, REASON_TARGET_NOT_FOUND, TickOutcome};
use self::target::TargetApi;
pub use self::target::TargetStores;
pub use self::unacked::hold_if_unacked_unknown;
use crate::error::Error;
use crate::metrics::ResultLabels;
use crate::observe::BrokerTarget;

/// How a successful reconcile ended (the `result` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Scaled,
    Unchanged,
    Paused,
    MetricsUnavailable,
    InvalidSpec,
    TargetNotFound,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Scaled => "scaled",
            Outcome::Unchanged => "unchanged",
            Outcome::Paused => "paused",
            Outcome::MetricsUnavailable => "metrics_unavailable",
            Outcome::InvalidSpec => "invalid_spec",
            Outcome::TargetNotFound => "target_not_found",
        }
    }
}

/// `namespace/name` of a scaler, the `scaler` field of the reconcile span.
fn scaler_name(scaler: &QueueScaler) -> String {
    format!(
        "{}/{}",
        scaler.namespace().unwrap_or_default(),
        scaler.name_any()
    )
}

/// Reconciles one QueueScaler; records the result and duration metrics.
#[tracing::instrument(name = "reconcile", skip_all, fields(scaler = %scaler_name(&scaler)))]
pub async fn reconcile(scaler: Arc<QueueScaler>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_once(&scaler, &ctx, started).await;
    let label = match &result {
        Ok((outcome, _)) => outcome.label(),
        Err(err) => {
            if let Some(namespace) = scaler.namespace() {
                ctx.metrics
                    .record_scaler_error(&namespace, &scaler.name_any(), err.metric_label());
            }
            err.metric_label()
        }
    };
    let labels = ResultLabels {
        result: label.to_string(),
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    ctx.metrics
        .reconcile_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    let (_, action) = result?;
    if let Some(namespace) = scaler.namespace() {
        ctx.clear_errors(&(namespace, scaler.name_any()));
    }
    Ok(action)
}

/// Backs off exponentially per scaler (from `error_backoff_min`, doubling,
/// capped at `error_backoff_max`) after a failed reconcile.
#[tracing::instrument(name = "error_policy", skip_all, fields(scaler = %scaler_name(&scaler)))]
pub fn error_policy(scaler: Arc<QueueScaler>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = (scaler.namespace().unwrap_or_default(), scaler.name_any());
    let streak = ctx.count_error(&key);
    let delay = backoff_delay(
        streak,
        ctx.settings.error_backoff_min,
        ctx.settings.error_backoff_max,
    );
    tracing::warn!(
        error = %error,
        failures_in_a_row = streak,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// `min * 2^(streak-1)`, capped at `max`.
pub fn backoff_delay(streak: u32, min: Duration, max: Duration) -> Duration {
    let exponent = streak.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << exponent).min(max)
}

/// The delay before the next tick of a scaler whose tick started `elapsed`
/// ago: the rest of the polling interval, so that ticks start one interval
/// apart. Requeueing a whole interval after the reconcile ended made the
/// period the interval plus the reconcile's own time (30–90 ms in a debug
/// build), and a burst could wait more than 1 s for its tick at 1 s polling.
/// At least half an interval, so that a slow reconcile (a broker timing
/// out) is not followed at once by the next. Whole milliseconds.
pub fn next_tick(polling: Duration, elapsed: Duration) -> Duration {
    let rest = polling.saturating_sub(elapsed).max(polling / 2);
    Duration::from_millis(u64::try_from(rest.as_millis()).unwrap_or(u64::MAX))
}

/// One reconcile: the scaler's memory loaded once, the steps, the memory
/// committed once (also when a step failed: what was observed and decided
/// stays remembered).
async fn reconcile_once(
    scaler: &QueueScaler,
    ctx: &Context,
    started: Instant,
) -> Result<(Outcome, Action), Error> {
    let namespace = scaler.namespace().ok_or(Error::MissingNamespace)?;
    let key = (namespace, scaler.name_any());
    let mut memory = ctx.load(&key, scaler);
    let result = steps(scaler, ctx, &key, &mut memory, Utc::now()).await;
    // The tick's own time comes off the wait for the next one.
    let result = result.map(|(outcome, action)| {
        if action == Action::requeue(scaler.spec.polling_interval()) {
            let delay = next_tick(scaler.spec.polling_interval(), started.elapsed());
            (outcome, Action::requeue(delay))
        } else {
            (outcome, action)
        }
    });
    ctx.commit(&key, memory);
    result
}

/// The steps of one reconcile (see the module documentation).
async fn steps(
    scaler: &QueueScaler,
    ctx: &Context,
    key: &ScalerKey,
    memory: &mut Memory,
    now: DateTime<Utc>,
) -> Result<(Outcome, Action), Error> {
    let spec = &scaler.spec;
    let previous = memory.status_base(scaler);
    if let Err(err) = spec.validate() {
        let early = EarlyStop::new(REASON_INVALID_SPEC, "Validate", err.to_string());
        early
            .report(ctx, scaler, key, &previous, now, memory)
            .await?;
        let requeue = Action::requeue(ctx.settings.invalid_spec_requeue);
        return Ok((Outcome::InvalidSpec, requeue));
    }
    let polling = Action::requeue(spec.polling_interval());
    let target = match read_target(ctx, scaler, &key.0).await? {
        TargetRead::Found(target) => target,
        TargetRead::Missing(early) => {
            early
                .report(ctx, scaler, key, &previous, now, memory)
                .await?;
            return Ok((Outcome::TargetNotFound, polling));
        }
    };
    let current = target.scale.replicas;
    let broker_target = BrokerTarget {
        namespace: key.0.clone(),
        broker: spec.broker.clone(),
        queue: spec.queue.clone(),
    };
    let observed = observe::observe(ctx, &broker_target, spec.paused, current, memory).await;
    let decide::Decided {
        decision,
        held_from,
    } = decide::decide(spec, &observed, current, &mut memory.history, now);
    if held_from.is_some() {
        ctx.metrics.record_in_flight_guard("held");
    }
    report_observation(ctx, scaler, key, &observed, &decision).await;
    let plan = Plan {
        scaler,
        target: &target,
        broker_target: &broker_target,
        decision: &decision,
        now,
    };
    let scaled_at = apply::apply(ctx, &plan).await?;
    if scaled_at.is_some() {
        memory.history.record_scale(now, current, decision.replicas);
    }
    let tick = TickOutcome {
        generation: scaler.metadata.generation,
        now,
        current_replicas: current,
        decision: &decision,
        observation: observed.observation.clone(),
        observe_error: observed.error.as_ref(),
        consecutive_failures: observed.failures,
        paused: spec.paused,
        scaled_at,
        queue: &spec.queue.summary(),
        unacked_unknown: observed.unacked_unknown.is_some(),
        in_flight_held: held_from.map(|replicas| status::InFlightHeld {
            counted: observed.in_flight_raised,
            measured_replicas: replicas,
        }),
    };
    let next = status::after_tick(&previous, &tick);
    status::write(ctx, key, &previous, next, now, memory).await?;
    Ok((outcome(spec.paused, scaled_at, &observed), polling))
}

/// The `result` label of a reconcile that got as far as a decision.
fn outcome(paused: bool, scaled_at: Option<DateTime<Utc>>, observed: &Observed) -> Outcome {
    if paused {
        Outcome::Paused
    } else if scaled_at.is_some() {
        Outcome::Scaled
    } else if observed.error.is_some() {
        Outcome::MetricsUnavailable
    } else {
        Outcome::Unchanged
    }
}

/// What reading the scale target found.
enum TargetRead {
    Found(Box<Target>),
    /// It does not exist: `Ready=False/TargetNotFound`.
    Missing(EarlyStop),
}

/// The target's replicas and selector.
async fn read_target(
    ctx: &Context,
    scaler: &QueueScaler,
    namespace: &str,
) -> Result<TargetRead, Error> {
    let target_ref = &scaler.spec.scale_target_ref;
    let display = format!("{} {}/{}", target_ref.kind, namespace, target_ref.name);
    let api = TargetApi::new(ctx.client.clone(), namespace, target_ref.kind);
    let key = (
        target_ref.kind,
        namespace.to_owned(),
        target_ref.name.clone(),
    );
    match ctx.target_scale(&api, &key).await {
        Ok(scale) => Ok(TargetRead::Found(Box::new(Target {
            key,
            api,
            scale,
            display,
        }))),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            Ok(TargetRead::Missing(EarlyStop::new(
                REASON_TARGET_NOT_FOUND,
                "GetScale",
                format!("{display} not found"),
            )))
        }
        Err(source) => Err(Error::GetScale {
            target: display,
            source,
        }),
    }
}

/// The decision and a failed read, in the metrics; a Warning Event when the
/// queue just became unreadable.
async fn report_observation(
    ctx: &Context,
    scaler: &QueueScaler,
    (namespace, name): &ScalerKey,
    observed: &Observed,
    decision: &warren_scaling::Decision,
) {
    ctx.metrics
        .record_decision(namespace, name, decision.reason.label());
    let Some(err) = &observed.error else {
        return;
    };
    ctx.metrics
        .record_scaler_error(namespace, name, err.metric_label());
    if observed.previous_failures == 0 {
        let queue = scaler.spec.queue.summary();
        let message = format!("cannot read queue {queue:?}: {err}");
        let (warning, reason) = (EventType::Warning, "MetricsUnavailable");
        record_event(ctx, scaler, warning, reason, "Observe", &message).await;
    }
}

/// A reconcile that stops before observing: `Ready=False` with `reason`.
struct EarlyStop {
    reason: &'static str,
    /// The Event's action.
    action: &'static str,
    message: String,
}

impl EarlyStop {
    fn new(reason: &'static str, action: &'static str, message: String) -> Self {
        Self {
            reason,
            action,
            message,
        }
    }

    /// A Warning Event (unless the status already says the same) and the
    /// `Ready=False` status.
    async fn report(
        self,
        ctx: &Context,
        scaler: &QueueScaler,
        key: &ScalerKey,
        previous: &QueueScalerStatus,
        now: DateTime<Utc>,
        memory: &mut Memory,
    ) -> Result<(), Error> {
        let Self {
            reason,
            action,
            message,
        } = self;
        if !status::already_not_ready(previous, reason, &message) {
            record_event(ctx, scaler, EventType::Warning, reason, action, &message).await;
        }
        let generation = scaler.metadata.generation;
        let next = status::not_ready(previous, generation, reason, message, now);
        status::write(ctx, key, previous, next, now, memory).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_start_one_polling_interval_apart() {
        let second = Duration::from_secs(1);
        // A reconcile of 80 ms: the next one starts 920 ms after it ended.
        assert_eq!(
            next_tick(second, Duration::from_millis(80)),
            Duration::from_millis(920)
        );
        assert_eq!(next_tick(second, Duration::ZERO), second);
        assert_eq!(
            next_tick(second, Duration::from_micros(80_400)),
            Duration::from_millis(919)
        );
        // A slow one (a broker timing out) is not followed at once.
        assert_eq!(
            next_tick(second, Duration::from_millis(700)),
            Duration::from_millis(500)
        );
        assert_eq!(
            next_tick(second, Duration::from_secs(12)),
            Duration::from_millis(500)
        );
        assert_eq!(
            next_tick(Duration::from_secs(30), Duration::from_secs(1)),
            Duration::from_secs(29)
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let delays: Vec<u64> = (1..=11)
            .map(|n| backoff_delay(n, min, max).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX, min, max), max);
    }

    fn observed(error: bool) -> Observed {
        let input = warren_scaling::DecisionInput::unavailable(1, 0);
        Observed {
            input,
            observation: None,
            error: error.then(|| crate::observe::ObserveError::QueueNotFound {
                queue: "q".into(),
                vhost: "/".into(),
            }),
            previous_failures: 0,
            failures: u32::from(error),
            unacked_unknown: None,
            read_from: None,
            in_flight_raised: 0,
        }
    }

    #[test]
    fn the_outcome_label_prefers_paused_then_scaled_then_a_failed_read() {
        let now = Some(Utc::now());
        assert_eq!(outcome(true, now, &observed(true)), Outcome::Paused);
        assert_eq!(outcome(false, now, &observed(true)), Outcome::Scaled);
        assert_eq!(
            outcome(false, None, &observed(true)),
            Outcome::MetricsUnavailable
        );
        assert_eq!(outcome(false, None, &observed(false)), Outcome::Unchanged);
    }
}

//! warren-worker: consumes jobs (one at a time by default) and never loses one.
//!
//! - Queues: `WARREN_QUEUE`, plus any in `WARREN_QUEUES`. One consumer per
//!   queue on one channel; jobs are taken from the queues in turn
//!   ([`fair`]), so a flood on one queue never starves another.
//! - Concurrency (default 1): up to N jobs in hand at once, each acked on its
//!   own when its work is done. Prefetch per consumer: at least N (default N).
//!   The prefetch is per consumer (quorum queues have no channel-wide QoS),
//!   so the broker may hand a worker up to prefetch x queues deliveries
//!   ([`Args::most_held`]); the ones not started yet wait in the worker.
//! - Simulated work: `seconds_per_dot` seconds per dot in the message.
//! - SIGTERM: hold acks, take the jobs the broker pushes for the acks just
//!   sent ([`settle`]: at most [`settle::ACK_SETTLE`]), cancel every consumer,
//!   finish every job in hand (and any the broker had already pushed, from
//!   every queue: at most `most_held`), ack them, close, exit 0. Nothing is
//!   handed back, so nothing is redelivered.
//! - Broker loss: reconnect with backoff. Unacked jobs go back to the queue
//!   (the broker redelivers them); the worker keeps nothing across reconnects.
//! - Poison: a body that is not a job envelope is rejected without requeue,
//!   so the broker dead-letters it to `<queue>.dead`. A job that keeps
//!   crashing its workers is dead-lettered by the quorum queue's delivery limit.
//! - The AMQP connection is named after `POD_NAME`, which is how the
//!   controller tells busy pods from idle ones (unacked deliveries per
//!   connection: busy while any job is in hand).
//! - Audit events (`message.processed`, `message.dead_lettered`) are
//!   published in batches: a few broker messages a second, not one per job.

pub mod fair;
pub mod job;
pub mod metrics;
pub mod settle;

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use warren_broker::{
    AuditSink, Backoff, Batching, BrokerArgs, ConnectError, Topology, close_quietly, connect,
    redact_url,
};
use warren_telemetry::{LogArgs, Readiness};

use crate::fair::{Fair, Turn};
use crate::job::{JobContext, Outcome, SettleError};
use crate::metrics::WorkerMetrics;

/// Command-line flags and environment variables.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "warren-worker",
    version,
    about = "Consumes warren jobs (one at a time by default); acks each after its work; never loses one"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// More queues to consume besides WARREN_QUEUE, comma-separated (e.g.
    /// `sms,email`; the sender reads the same variable for POST /send/{queue},
    /// so one setting serves both). Jobs are taken from the queues in turn.
    /// The broker may hand this worker up to WARREN_PREFETCH jobs per queue;
    /// on SIGTERM it finishes them all.
    #[arg(long, env = "WARREN_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "WARREN_LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub listen_addr: SocketAddr,
    /// Seconds of simulated work per dot in the message.
    #[arg(long, env = "WARREN_SECONDS_PER_DOT", default_value_t = 1.0)]
    pub seconds_per_dot: f64,
    /// Jobs this worker runs at once, each acked on its own when done. 1 is
    /// the seed's worker: one job at a time.
    #[arg(long, env = "WARREN_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Unacked jobs the broker may hand this worker at once; at least
    /// WARREN_CONCURRENCY (a lower value is refused). Default: WARREN_CONCURRENCY.
    #[arg(long, env = "WARREN_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Audit events per broker message at most: `message.processed` events
    /// are published in batches (1: one message per event).
    #[arg(long, env = "WARREN_AUDIT_BATCH", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub audit_batch: u16,
    /// Longest wait, in milliseconds, before a batch of audit events that is
    /// not full is published.
    #[arg(long, env = "WARREN_AUDIT_LINGER_MS", default_value_t = 1000)]
    pub audit_linger_ms: u64,
    /// This worker's name: its AMQP connection name and consumer tag (the pod name on Kubernetes).
    #[arg(long, env = "POD_NAME", default_value = "warren-worker")]
    pub pod_name: String,
    /// First delay before reconnecting to the broker, in milliseconds (doubles up to the max).
    #[arg(long, env = "WARREN_RECONNECT_MIN_MS", default_value_t = 200)]
    pub reconnect_min_ms: u64,
    /// Longest delay between reconnect attempts, in milliseconds.
    #[arg(long, env = "WARREN_RECONNECT_MAX_MS", default_value_t = 5000)]
    pub reconnect_max_ms: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// A configuration the worker refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "WARREN_PREFETCH ({prefetch}) is below WARREN_CONCURRENCY ({concurrency}): the broker would \
         never hand this worker more than {prefetch} jobs at once, so it could not run {concurrency}. \
         Set WARREN_PREFETCH to at least {concurrency}, or leave it unset (it then equals WARREN_CONCURRENCY)"
    )]
    PrefetchBelowConcurrency { prefetch: u16, concurrency: u16 },
}

impl Args {
    /// The prefetch to ask the broker for: WARREN_PREFETCH, or
    /// WARREN_CONCURRENCY when unset. Below the concurrency is an error.
    pub fn prefetch(&self) -> Result<u16, ConfigError> {
        match self.prefetch {
            None => Ok(self.concurrency),
            Some(prefetch) if prefetch < self.concurrency => {
                Err(ConfigError::PrefetchBelowConcurrency {
                    prefetch,
                    concurrency: self.concurrency,
                })
            }
            Some(prefetch) => Ok(prefetch),
        }
    }

    /// Every queue this worker consumes, in order: WARREN_QUEUE, then
    /// WARREN_QUEUES, each once; blank entries are ignored (as the sender does).
    pub fn consumed_queues(&self) -> Vec<String> {
        self.broker.queues_with(&self.queues)
    }

    /// The most deliveries the broker may hand this worker at once: the
    /// prefetch of each consumer, one consumer per queue. On SIGTERM the
    /// worker finishes all of them, `concurrency` at a time.
    pub fn most_held(&self) -> Result<usize, ConfigError> {
        Ok(usize::from(self.prefetch()?) * self.consumed_queues().len())
    }
}

/// The consumer tag for `queue`: the pod name, with the queue after a `/`
/// when the worker consumes several (tags are unique per channel).
fn consumer_tag(pod_name: &str, queue: &str, several: bool) -> String {
    if several {
        format!("{pod_name}/{queue}")
    } else {
        pod_name.to_string()
    }
}

/// Why a consuming session ended.
enum SessionEnd {
    Shutdown,
    Lost(SessionError),
}

/// Why the worker lost (or never got) its broker session; it reconnects.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("setting up the consumers: {0}")]
    Setup(#[source] lapin::Error),
    #[error("no consumer left")]
    NoConsumer,
    #[error("the broker cancelled the consumer of queue {queue}")]
    ConsumerCancelled { queue: Arc<str> },
    #[error("consumer error on queue {queue}: {source}")]
    Consumer {
        queue: Arc<str>,
        #[source]
        source: lapin::Error,
    },
    #[error(transparent)]
    Job(#[from] JobError),
}

/// Why a job in hand did not end with the broker told: it stays unacked
/// and the broker redelivers it.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Settle(#[from] SettleError),
    #[error("a job panicked")]
    Panicked,
    #[error("a job was cancelled")]
    Cancelled,
}

impl From<JoinError> for JobError {
    fn from(err: JoinError) -> Self {
        if err.is_panic() {
            JobError::Panicked
        } else {
            JobError::Cancelled
        }
    }
}

/// Consumes until `shutdown` fires (after finishing the jobs in hand).
pub async fn run(
    args: Args,
    metrics: WorkerMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prefetch = args.prefetch()?;
    let most_held = args.most_held()?;
    let queues = args.consumed_queues();
    let topology = Topology::new(queues.clone(), args.broker.queue_type)
        .with_events_log(args.broker.events_log.retention());
    let audit = AuditSink::spawn_batched(
        AUDIT_BUFFER,
        Batching {
            max_events: usize::from(args.audit_batch),
            linger: Duration::from_millis(args.audit_linger_ms),
        },
    );
    let jobs = Arc::new(JobContext {
        worker: args.pod_name.clone(),
        seconds_per_dot: args.seconds_per_dot,
        audit,
        metrics: metrics.clone(),
        settle: settle::SettleGate::default(),
    });
    let queues: Vec<Arc<str>> = queues.into_iter().map(Arc::from).collect();
    let session = Session {
        args: &args,
        queues: &queues,
        prefetch,
        topology: &topology,
        jobs: &jobs,
        metrics: &metrics,
        readiness: &readiness,
        shutdown: &shutdown,
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(args.reconnect_min_ms.max(1)),
        Duration::from_millis(args.reconnect_max_ms.max(args.reconnect_min_ms).max(1)),
    );
    let url = redact_url(&args.broker.amqp_url);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = connect(&args.broker.amqp_url, &args.pod_name, Duration::from_secs(10)) => connected,
        };
        let end = match connected {
            Ok(connection) => {
                tracing::info!(url = %url, queues = ?queues, prefetch, concurrency = args.concurrency, most_held, "connected");
                session.run_connected(connection, &mut backoff).await
            }
            Err(err) => SessionEnd::Lost(err.into()),
        };
        match end {
            SessionEnd::Shutdown => {
                tracing::info!("stopped consuming; exiting");
                return Ok(());
            }
            SessionEnd::Lost(reason) => {
                metrics.reconnects.inc();
                let delay = backoff.next_delay();
                tracing::warn!(reason = %reason, retry_in = ?delay, "broker connection lost or refused; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Audit events buffered before new ones are dropped (a burst of jobs
/// faster than the batches go out).
const AUDIT_BUFFER: usize = 10_000;

/// What one connection's consuming session works with.
struct Session<'a> {
    args: &'a Args,
    /// The queues consumed, one consumer each, in [`Args::consumed_queues`] order.
    queues: &'a [Arc<str>],
    prefetch: u16,
    topology: &'a Topology,
    jobs: &'a Arc<JobContext>,
    metrics: &'a WorkerMetrics,
    readiness: &'a Readiness,
    shutdown: &'a CancellationToken,
}

/// The jobs in hand: each runs in its own task until acked.
struct InHand<'a> {
    tasks: JoinSet<Result<Outcome, SettleError>>,
    jobs: &'a Arc<JobContext>,
    metrics: &'a WorkerMetrics,
}

impl<'a> InHand<'a> {
    fn new(jobs: &'a Arc<JobContext>, metrics: &'a WorkerMetrics) -> Self {
        Self {
            tasks: JoinSet::new(),
            jobs,
            metrics,
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Starts a job from `queue`.
    fn start(&mut self, queue: Arc<str>, delivery: lapin::message::Delivery) {
        self.tasks
            .spawn(job::process(self.jobs.clone(), queue, delivery));
        self.update_gauges();
    }

    /// Waits for the next job to finish. Err: its ack could not be sent
    /// (the connection is gone; the broker redelivers it).
    async fn next_finished(&mut self) -> Result<(), JobError> {
        let joined = self.tasks.join_next().await;
        self.update_gauges();
        match joined {
            None | Some(Ok(Ok(_))) => Ok(()),
            Some(Ok(Err(err))) => Err(err.into()),
            Some(Err(err)) => Err(err.into()),
        }
    }

    /// Busy while any job is in hand.
    fn update_gauges(&self) {
        let n = self.tasks.len() as i64;
        self.metrics.jobs_in_hand.set(n);
        self.metrics.busy.set(i64::from(n > 0));
    }
}

impl Session<'_> {
    /// One connection's life: follows its blocked state, serves until it
    /// ends, then lets go of the connection (flushing the audit events of
    /// the last jobs on the way out).
    async fn run_connected(&self, connection: Connection, backoff: &mut Backoff) -> SessionEnd {
        let blocked = tokio::spawn(follow_blocked(
            connection.events_listener(),
            self.metrics.broker_blocked.clone(),
        ));
        let end = self.serve(&connection).await;
        // A session that got as far as consuming was healthy: the next
        // reconnect starts from the shortest delay again.
        if self.readiness.is_ready() {
            backoff.reset();
        }
        self.readiness.set(false);
        blocked.abort();
        self.metrics.broker_blocked.set(0);
        if matches!(end, SessionEnd::Shutdown) {
            // The events of the last jobs, before the connection goes.
            self.jobs.audit.flush(Duration::from_secs(2)).await;
        }
        self.jobs.audit.detach();
        close_quietly(&connection).await;
        end
    }

    /// Declares, consumes and runs jobs until SIGTERM (then finishes the
    /// jobs in hand) or until the connection is lost (then the jobs in hand
    /// are abandoned: unacked, the broker redelivers them).
    async fn serve(&self, connection: &Connection) -> SessionEnd {
        let (channel, mut consumers) = match self.setup(connection).await {
            Ok(parts) => parts,
            Err(err) => return SessionEnd::Lost(SessionError::Setup(err)),
        };
        self.readiness.set(true);
        tracing::info!(queues = ?self.queues, consumer = %self.args.pod_name, "waiting for jobs");
        let concurrency = usize::from(self.args.concurrency);
        let mut in_hand = InHand::new(self.jobs, self.metrics);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                finished = in_hand.next_finished(), if !in_hand.is_empty() => {
                    if let Err(reason) = finished {
                        return SessionEnd::Lost(reason.into());
                    }
                }
                turn = consumers.next(), if in_hand.len() < concurrency => match turn {
                    None => return SessionEnd::Lost(SessionError::NoConsumer),
                    Some(Turn::Ended { index }) => return SessionEnd::Lost(SessionError::ConsumerCancelled {
                        queue: self.queues[index].clone(),
                    }),
                    Some(Turn::Item { index, item: Err(source) }) => return SessionEnd::Lost(SessionError::Consumer {
                        queue: self.queues[index].clone(),
                        source,
                    }),
                    Some(Turn::Item { index, item: Ok(delivery) }) => {
                        in_hand.start(self.queues[index].clone(), delivery);
                    }
                },
            }
        }
        // SIGTERM. Hold the acks, take what the broker pushes for the acks
        // just sent, cancel the consumers so it pushes nothing more, then
        // finish what is in hand (see the settle module).
        tracing::info!(
            in_hand = in_hand.len(),
            "SIGTERM: no more jobs; finishing the ones in hand"
        );
        let held = self.jobs.settle.close().await;
        if let Some(quiet_at) = self.jobs.settle.quiet_at() {
            take_pushed_jobs(
                &mut consumers,
                self.queues,
                &mut in_hand,
                concurrency,
                quiet_at.into(),
            )
            .await;
        }
        for tag in self.consumer_tags() {
            stop_consuming(&channel, &tag).await;
        }
        drop(held);
        finish_in_hand(&mut consumers, self.queues, &mut in_hand, concurrency).await;
        close_channel(&channel).await;
        SessionEnd::Shutdown
    }

    /// The consumer tags, one per queue, in `queues` order.
    fn consumer_tags(&self) -> Vec<String> {
        let several = self.queues.len() > 1;
        self.queues
            .iter()
            .map(|queue| consumer_tag(&self.args.pod_name, queue, several))
            .collect()
    }

    /// The channel and one consumer per queue (prefetch per consumer); the
    /// events channel goes to the audit sink.
    async fn setup(
        &self,
        connection: &Connection,
    ) -> Result<(Channel, Fair<Consumer>), lapin::Error> {
        self.topology
            .declare(connection)
            .await
            .map_err(|err| err.source)?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumers = Vec::with_capacity(self.queues.len());
        for (queue, tag) in self.queues.iter().zip(self.consumer_tags()) {
            let consumer = channel
                .basic_consume(
                    ShortString::from(&**queue),
                    ShortString::from(tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
        }
        self.jobs.audit.attach(connection.create_channel().await?);
        Ok((channel, Fair::new(consumers)))
    }
}

/// Before the consumers are cancelled, with acks held: starts the jobs the
/// broker pushes until `quiet_at` (the acks sent before SIGTERM gave it credit
/// to push them). Jobs beyond the concurrency stay in their consumer's
/// stream, for [`finish_in_hand`].
async fn take_pushed_jobs(
    consumers: &mut Fair<Consumer>,
    queues: &[Arc<str>],
    in_hand: &mut InHand<'_>,
    concurrency: usize,
    quiet_at: tokio::time::Instant,
) {
    let quiet = tokio::time::sleep_until(quiet_at);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => return,
            turn = consumers.next(), if in_hand.len() < concurrency => match turn {
                Some(Turn::Item { index, item: Ok(delivery) }) => {
                    tracing::info!(queue = %queues[index], "SIGTERM: a job pushed for an ack sent just before; it will be finished");
                    in_hand.start(queues[index].clone(), delivery);
                }
                // A consumer ended or failed: finish_in_hand deals with it.
                _ => return,
            },
        }
    }
}

/// After the consumers were cancelled: runs to their ack the jobs in hand
/// and any delivery the broker pushed before the cancel, from every queue
/// (it is this worker's; handed back it would come again as a redelivery).
async fn finish_in_hand(
    consumers: &mut Fair<Consumer>,
    queues: &[Arc<str>],
    in_hand: &mut InHand<'_>,
    concurrency: usize,
) {
    let mut consumers_open = true;
    while consumers_open || !in_hand.is_empty() {
        tokio::select! {
            finished = in_hand.next_finished(), if !in_hand.is_empty() => {
                if let Err(reason) = finished {
                    tracing::warn!(reason = %reason, "a job in hand could not be acked; the broker will redeliver it");
                }
            }
            turn = consumers.next(), if consumers_open && in_hand.len() < concurrency => match turn {
                Some(Turn::Item { index, item: Ok(delivery) }) => {
                    in_hand.start(queues[index].clone(), delivery);
                }
                // One cancel took effect: the others may still hand over a job.
                Some(Turn::Ended { .. }) => {}
                // Every cancel took effect (or the connection is gone).
                None | Some(Turn::Item { item: Err(_), .. }) => consumers_open = false,
            },
            // A consumer whose cancel never got an answer: stop waiting.
            _ = tokio::time::sleep(Duration::from_secs(2)), if consumers_open && in_hand.is_empty() => {
                consumers_open = false;
            }
        }
    }
}

/// Logs RabbitMQ's `connection.blocked`/`unblocked` and mirrors it in the
/// `warren_worker_broker_blocked` gauge. This connection publishes audit
/// events, so an alarm blocks it, and a blocked connection's acks wait too.
async fn follow_blocked(
    events: impl futures::Stream<Item = lapin::Event>,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let Some(blocked) = warren_broker::blocked_transition(&event, "worker") {
            gauge.set(i64::from(blocked));
        }
    }
}

/// Cancels a consumer: the broker sends it no more jobs.
async fn stop_consuming(channel: &Channel, consumer_tag: &str) {
    let _ = channel
        .basic_cancel(
            ShortString::from(consumer_tag),
            BasicCancelOptions::default(),
        )
        .await;
}

/// Closes the channel; unacked deliveries go back to the queue.
async fn close_channel(channel: &Channel) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "shutting down".into()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_match_the_contract() {
        let args = Args::try_parse_from(["warren-worker"]).unwrap();
        assert_eq!(args.broker.queue, "tasks");
        assert_eq!(args.concurrency, 1);
        assert_eq!(args.prefetch().unwrap(), 1);
        assert_eq!(args.listen_addr.port(), 9090);
        assert_eq!(args.seconds_per_dot, 1.0);
    }

    #[test]
    fn the_queues_are_warren_queue_then_warren_queues_each_once() {
        let args = Args::try_parse_from(["warren-worker"]).unwrap();
        assert_eq!(args.consumed_queues(), vec!["tasks"]);
        assert_eq!(args.most_held().unwrap(), 1);
        let args = Args::try_parse_from([
            "warren-worker",
            "--queue",
            "sms",
            "--queues",
            "email, sms,,push",
        ])
        .unwrap();
        assert_eq!(args.consumed_queues(), vec!["sms", "email", "push"]);
        assert_eq!(args.most_held().unwrap(), 3, "prefetch 1 per queue");
        let args = Args::try_parse_from([
            "warren-worker",
            "--queues",
            "sms,email",
            "--concurrency",
            "2",
            "--prefetch",
            "5",
        ])
        .unwrap();
        assert_eq!(args.consumed_queues(), vec!["tasks", "sms", "email"]);
        assert_eq!(args.most_held().unwrap(), 15, "prefetch x queues");
    }

    #[test]
    fn consumer_tags_are_the_pod_name_and_unique_per_queue() {
        assert_eq!(consumer_tag("pod-1", "tasks", false), "pod-1");
        assert_eq!(consumer_tag("pod-1", "sms", true), "pod-1/sms");
    }

    #[test]
    fn zero_prefetch_or_concurrency_is_refused() {
        assert!(Args::try_parse_from(["warren-worker", "--prefetch", "0"]).is_err());
        assert!(Args::try_parse_from(["warren-worker", "--concurrency", "0"]).is_err());
    }

    #[test]
    fn prefetch_follows_concurrency_and_may_not_be_below_it() {
        let args = Args::try_parse_from(["warren-worker", "--concurrency", "10"]).unwrap();
        assert_eq!(
            args.prefetch().unwrap(),
            10,
            "unset: equal to the concurrency"
        );
        let args =
            Args::try_parse_from(["warren-worker", "--concurrency", "4", "--prefetch", "20"])
                .unwrap();
        assert_eq!(args.prefetch().unwrap(), 20);
        let args =
            Args::try_parse_from(["warren-worker", "--concurrency", "10", "--prefetch", "2"])
                .unwrap();
        let err = args.prefetch().unwrap_err().to_string();
        assert!(
            err.contains("WARREN_PREFETCH (2) is below WARREN_CONCURRENCY (10)"),
            "{err}"
        );
    }
}

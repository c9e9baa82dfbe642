//! The queues and exchanges warren uses, declared idempotently by whichever
//! process starts first.
//!
//! For each work queue `q`:
//! - `q`: durable; quorum by default (classic by config), dead-lettering to
//!   the exchange `warren.dlx` with routing key `q.dead`; quorum queues also
//!   get `x-delivery-limit` so a job that keeps crashing its workers is
//!   dead-lettered instead of looping forever.
//! - `q.dead`: the durable dead-letter queue, bound to `warren.dlx` with `q.dead`.
//!
//! Audit events (seed 004's `logs` queue): the durable topic exchange
//! `warren.events`, with `warren.events.log` bound to `#`: a RabbitMQ
//! **stream** with bounded retention (see [`EventsLogRetention`]), so the log
//! keeps recent events for any number of readers, from any point in time
//! ([`crate::events_log`]), and never fills the broker.
//!
//! An existing `warren.events.log` declared otherwise (the unbounded classic
//! queue of earlier versions) makes RabbitMQ refuse the declaration with
//! PRECONDITION_FAILED. That refusal is isolated on its own channel and
//! reported ([`EventsLogStatus::Legacy`], a warning with the upgrade command):
//! the process keeps running and events keep flowing into the old queue
//! until an operator replaces it (`warren-events migrate`).

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

/// The dead-letter exchange.
pub const DEAD_LETTER_EXCHANGE: &str = "warren.dlx";
/// The audit events exchange (topic).
pub const EVENTS_EXCHANGE: &str = "warren.events";
/// The queue that keeps every audit event.
pub const EVENTS_LOG_QUEUE: &str = "warren.events.log";
/// Deliveries after which a quorum queue dead-letters a message.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// Default age after which events leave the log (RabbitMQ's `x-max-age` syntax).
pub const DEFAULT_EVENTS_MAX_AGE: &str = "7D";
/// Default size bound of the log's on-disk segments, in bytes.
pub const DEFAULT_EVENTS_MAX_BYTES: u64 = 100_000_000;
/// RabbitMQ's default (and largest sensible) stream segment.
const MAX_SEGMENT_BYTES: u64 = 500_000_000;
/// Segments per size bound: retention removes whole segments.
const SEGMENTS_PER_BOUND: u64 = 10;
/// Of those, the closed segments RabbitMQ may keep (`x-max-length-bytes`).
const CLOSED_SEGMENTS: u64 = 8;

/// How long and how much the events log keeps: a stream with `x-max-age`
/// and `x-max-length-bytes`.
///
/// A stream is stored in segment files and retention removes whole closed
/// segments: when a segment fills up, RabbitMQ deletes the oldest ones while
/// the closed segments exceed `x-max-length-bytes`, and deletes segments whose
/// newest event is older than `x-max-age`. The segment being written comes on
/// top (measured on 3.10: a 1 MB `x-max-length-bytes` with 100 kB segments
/// kept 9 closed segments plus the open one, 965 864 bytes). So that
/// `max_bytes` is a real upper bound on disk, segments are a tenth of it and
/// `x-max-length-bytes` is eight tenths: the log holds at most 90% of
/// `max_bytes` plus one chunk, and at least 70% once it has filled up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsLogRetention {
    /// `x-max-age`: a number and a unit, `Y`, `M`, `D`, `h`, `m` or `s` (e.g. `7D`, `12h`).
    pub max_age: String,
    /// The most bytes the log's segment files may hold on disk.
    pub max_bytes: u64,
}

impl Default for EventsLogRetention {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_EVENTS_MAX_AGE.to_string(),
            max_bytes: DEFAULT_EVENTS_MAX_BYTES,
        }
    }
}

impl EventsLogRetention {
    /// `x-stream-max-segment-size-bytes`: a tenth of the bound (at most RabbitMQ's default).
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / SEGMENTS_PER_BOUND).clamp(1, MAX_SEGMENT_BYTES)
    }

    /// `x-max-length-bytes`: the closed segments kept, eight segments' worth.
    pub fn closed_segment_bytes(&self) -> u64 {
        self.segment_bytes().saturating_mul(CLOSED_SEGMENTS)
    }

    /// The declare arguments of the events log.
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("stream")),
        );
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(LongString::from(self.max_age.as_str())),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.closed_segment_bytes()).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(i64::try_from(self.segment_bytes()).unwrap_or(i64::MAX)),
        );
        args
    }
}

/// Checks a RabbitMQ `x-max-age` value: digits followed by one of `YMDhms`.
pub fn parse_max_age(value: &str) -> Result<String, String> {
    let (digits, unit) = value.split_at(value.len().saturating_sub(1));
    let valid_number = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0);
    if valid_number && matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s") {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not a RabbitMQ max-age: a positive number and a unit, Y, M, D, h, m or s (e.g. 7D, 12h)"
        ))
    }
}

/// What the declaration found for the events log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsLogStatus {
    /// The log is the bounded stream.
    Bounded,
    /// A `warren.events.log` declared otherwise exists (the unbounded queue of
    /// earlier versions): the broker refused the bounded declaration.
    Legacy { reason: String },
    /// The broker did not declare it (no answer in time, or another error):
    /// the process runs on, audit events are not kept until it is back.
    Unavailable { reason: String },
}

/// How long a process waits for the events log's declaration before it goes
/// on without it.
pub const EVENTS_LOG_DECLARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The upgrade path printed when an old, unbounded log is found.
pub const EVENTS_LOG_UPGRADE_HINT: &str = "replace it with the bounded stream: `warren-events migrate --amqp-url ...` \
     (or `rabbitmqctl delete_queue warren.events.log`, then restart one warren process); \
     the events it holds are deleted with it, so read them first if you need them";

/// The kind of work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated Raft queue; poison-message protection by delivery limit.
    #[default]
    Quorum,
    /// Single-node queue (no delivery limit).
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// The name of `queue`'s dead-letter queue (also its dead-letter routing key).
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The declare arguments of a work queue.
pub fn work_queue_arguments(queue: &str, queue_type: QueueType, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead_letter_queue(queue).as_str())),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(delivery_limit)),
        );
    }
    args
}

/// Everything a process declares before it publishes or consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Work queues (the default queue first).
    pub work_queues: Vec<String>,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    /// Retention of `warren.events.log`.
    pub events_log: EventsLogRetention,
}

impl Topology {
    pub fn new(work_queues: Vec<String>, queue_type: QueueType) -> Self {
        Self {
            work_queues,
            queue_type,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            events_log: EventsLogRetention::default(),
        }
    }

    /// The same topology with another events log retention.
    pub fn with_events_log(mut self, retention: EventsLogRetention) -> Self {
        self.events_log = retention;
        self
    }

    /// Declares the exchanges, work queues, dead-letter queues and the events
    /// log, on channels of its own (closed afterwards). Idempotent:
    /// redeclaring with the same arguments is a no-op for RabbitMQ. A work
    /// queue that exists with other arguments (say classic where quorum is
    /// configured) fails with PRECONDITION_FAILED, reported with the queue's
    /// name. An events log that exists with other arguments is not an error:
    /// it is reported as [`EventsLogStatus::Legacy`] (and logged with the
    /// upgrade path), because audit events must never stop the jobs.
    pub async fn declare(&self, connection: &Connection) -> Result<EventsLogStatus, TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| TopologyError::at("a channel for the topology", source))?;
        self.declare_on(&channel).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        match self.declare_events_log(connection).await {
            Ok(status) => Ok(status),
            Err(err) => {
                let reason = err.to_string();
                tracing::warn!(
                    queue = EVENTS_LOG_QUEUE,
                    error = %reason,
                    "the events log is unavailable; jobs go on, audit events are not kept until it is back"
                );
                Ok(EventsLogStatus::Unavailable { reason })
            }
        }
    }

    /// The events log, on a channel of its own: a refused declaration closes
    /// the channel it was made on, and one that gets no answer (a stream that
    /// is down, as a single-node 3.10 stream is after a broker crash) is
    /// abandoned after [`EVENTS_LOG_DECLARE_TIMEOUT`].
    async fn declare_events_log(
        &self,
        connection: &Connection,
    ) -> Result<EventsLogStatus, TopologyError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
        let declare = channel.queue_declare(
            ShortString::from(EVENTS_LOG_QUEUE),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            self.events_log.arguments(),
        );
        let Ok(declared) = tokio::time::timeout(EVENTS_LOG_DECLARE_TIMEOUT, declare).await else {
            tokio::spawn(async move {
                let _ = channel
                    .close(200, "events log declare timed out".into())
                    .await;
            });
            return Err(TopologyError::timeout(EVENTS_LOG_QUEUE));
        };
        match declared {
            Ok(_) => {}
            Err(err) if is_precondition_failed(&err) => {
                let reason = err.to_string();
                tracing::warn!(
                    queue = EVENTS_LOG_QUEUE,
                    error = %reason,
                    "the events log exists without the configured retention (an unbounded queue of an earlier version); \
                     audit events keep flowing into it, but it is not bounded: {EVENTS_LOG_UPGRADE_HINT}"
                );
                return Ok(EventsLogStatus::Legacy { reason });
            }
            Err(source) => return Err(TopologyError::at(EVENTS_LOG_QUEUE, source)),
        }
        channel
            .queue_bind(
                ShortString::from(EVENTS_LOG_QUEUE),
                ShortString::from(EVENTS_EXCHANGE),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
        let _ = channel.close(200, "events log declared".into()).await;
        Ok(EventsLogStatus::Bounded)
    }

    /// Replaces a legacy events log (any `warren.events.log` that is not the
    /// bounded stream) by the bounded stream. Deletes the old queue and the
    /// events in it. Returns what it found before: `Bounded` means nothing
    /// had to be done.
    pub async fn migrate_events_log(
        &self,
        connection: &Connection,
    ) -> Result<EventsLogStatus, MigrateError> {
        let found = self.declare_events_log(connection).await?;
        if let EventsLogStatus::Legacy { .. } = &found {
            let channel = connection
                .create_channel()
                .await
                .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
            channel
                .queue_delete(
                    ShortString::from(EVENTS_LOG_QUEUE),
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
            let _ = channel.close(200, "legacy events log deleted".into()).await;
            if let EventsLogStatus::Legacy { reason } = self.declare_events_log(connection).await? {
                return Err(MigrateError::StillRefused(reason));
            }
        }
        Ok(found)
    }

    /// Exchanges, work queues and dead-letter queues on `channel`.
    async fn declare_on(&self, channel: &lapin::Channel) -> Result<(), TopologyError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                ShortString::from(DEAD_LETTER_EXCHANGE),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(DEAD_LETTER_EXCHANGE, source))?;
        channel
            .exchange_declare(
                ShortString::from(EVENTS_EXCHANGE),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(EVENTS_EXCHANGE, source))?;
        for queue in &self.work_queues {
            let dead = dead_letter_queue(queue);
            channel
                .queue_declare(
                    ShortString::from(dead.as_str()),
                    durable_queue,
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError::at(&dead, source))?;
            channel
                .queue_bind(
                    ShortString::from(dead.as_str()),
                    ShortString::from(DEAD_LETTER_EXCHANGE),
                    ShortString::from(dead.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError::at(&dead, source))?;
            channel
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    durable_queue,
                    work_queue_arguments(queue, self.queue_type, self.delivery_limit),
                )
                .await
                .map_err(|source| TopologyError::at(queue, source))?;
        }
        Ok(())
    }
}

/// Whether `err` is the broker refusing a declaration that conflicts with an
/// existing object (AMQP reply code 406, PRECONDITION_FAILED).
pub fn is_precondition_failed(err: &lapin::Error) -> bool {
    err.to_string().contains("PRECONDITION_FAILED")
}

/// Why replacing a legacy events log failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Declare(#[from] TopologyError),
    #[error(
        "{EVENTS_LOG_QUEUE:?} still refuses the bounded declaration after the old queue was deleted: {0}"
    )]
    StillRefused(String),
}

/// A declaration the broker refused.
#[derive(Debug, thiserror::Error)]
#[error("declaring {name:?}: {source}")]
pub struct TopologyError {
    pub name: String,
    #[source]
    pub source: lapin::Error,
}

impl TopologyError {
    fn at(name: &str, source: lapin::Error) -> Self {
        Self {
            name: name.to_string(),
            source,
        }
    }

    fn timeout(name: &str) -> Self {
        Self::at(
            name,
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {EVENTS_LOG_DECLARE_TIMEOUT:?}"),
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(args: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        args.inner().get(&ShortString::from(key))
    }

    #[test]
    fn quorum_queue_arguments_dead_letter_and_limit_deliveries() {
        let args = work_queue_arguments("tasks", QueueType::Quorum, 5);
        assert_eq!(
            get(&args, "x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            get(&args, "x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("warren.dlx".into()))
        );
        assert_eq!(
            get(&args, "x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("tasks.dead".into()))
        );
        assert_eq!(
            get(&args, "x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(5))
        );
    }

    #[test]
    fn events_log_is_a_stream_bounded_by_age_and_bytes() {
        let retention = EventsLogRetention {
            max_age: "12h".into(),
            max_bytes: 5_000_000,
        };
        let args = retention.arguments();
        assert_eq!(
            get(&args, "x-queue-type"),
            Some(&AMQPValue::LongString("stream".into()))
        );
        assert_eq!(
            get(&args, "x-max-age"),
            Some(&AMQPValue::LongString("12h".into()))
        );
        assert_eq!(
            get(&args, "x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(4_000_000))
        );
        assert_eq!(
            get(&args, "x-stream-max-segment-size-bytes"),
            Some(&AMQPValue::LongLongInt(500_000))
        );
        assert_eq!(args.inner().len(), 4);
    }

    #[test]
    fn segments_are_a_tenth_of_the_bound_and_never_above_rabbitmqs_default() {
        let of = |max_bytes| {
            EventsLogRetention {
                max_bytes,
                ..EventsLogRetention::default()
            }
            .segment_bytes()
        };
        assert_eq!(of(100_000_000), 10_000_000);
        assert_eq!(of(50_000_000_000), 500_000_000);
        assert_eq!(of(5), 1);
        assert_eq!(EventsLogRetention::default().max_age, "7D");
    }

    #[test]
    fn max_age_accepts_rabbitmq_units_only() {
        for ok in ["7D", "12h", "30m", "45s", "1Y", "6M"] {
            assert_eq!(parse_max_age(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "D", "7", "7d", "0D", "-1D", "7 D", "1.5h", "7DD"] {
            assert!(parse_max_age(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn classic_queues_have_no_delivery_limit() {
        let args = work_queue_arguments("sms", QueueType::Classic, 5);
        assert_eq!(
            get(&args, "x-queue-type"),
            Some(&AMQPValue::LongString("classic".into()))
        );
        assert_eq!(get(&args, "x-delivery-limit"), None);
    }
}

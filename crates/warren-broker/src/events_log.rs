//! Reading the audit events log `warren.events.log`, a RabbitMQ stream.
//!
//! A stream is read without removing anything: any number of readers, each
//! from where it chooses ([`StartAt`]): the oldest retained event, the newest,
//! only new ones, an offset, or a point in time. Every entry carries its
//! offset, which grows by one per event, so a reader can tell the order and
//! resume where it stopped. `warren-events` (crate `warren-events`) is the CLI
//! over this module.
//!
//! Reading a stream over AMQP 0-9-1 needs a prefetch and manual acks (the
//! ack only moves the credit window; nothing is removed). Reading anything
//! else the same way would consume it: RabbitMQ refuses `x-stream-offset` on
//! a classic queue (the unbounded log of an earlier version), and
//! [`EventsLogReader`] also refuses any delivery without an `x-stream-offset`
//! header, handing it back.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Consumer};
use serde_json::Value;

use crate::topology::{EVENTS_LOG_QUEUE, is_precondition_failed};

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest event still retained.
    First,
    /// The newest chunk of events (the last few), then new ones.
    Last,
    /// Only events published after the reader attached.
    Next,
    /// This offset (or the oldest retained one, if it is gone).
    Offset(u64),
    /// Events published at or after this time.
    Time(DateTime<Utc>),
}

impl FromStr for StartAt {
    type Err = String;

    /// `first`, `last`, `next`, an offset (`1234`), an RFC 3339 time
    /// (`2026-11-29T23:00:00Z`) or a duration back from now (`15m`, `2h`,
    /// `1d`, `30s`).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "first" => return Ok(Self::First),
            "last" => return Ok(Self::Last),
            "next" => return Ok(Self::Next),
            _ => {}
        }
        if let Ok(offset) = value.parse::<u64>() {
            return Ok(Self::Offset(offset));
        }
        if let Ok(time) = DateTime::parse_from_rfc3339(value) {
            return Ok(Self::Time(time.with_timezone(&Utc)));
        }
        let (digits, unit) = value.split_at(value.len().saturating_sub(1));
        let seconds = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => 0,
        };
        match digits.parse::<i64>() {
            Ok(n) if seconds > 0 && n >= 0 => Ok(Self::Time(
                Utc::now() - chrono::Duration::seconds(n * seconds),
            )),
            _ => Err(format!(
                "{value:?}: expected first, last, next, an offset, an RFC 3339 time or a duration ago (15m, 2h, 1d)"
            )),
        }
    }
}

impl StartAt {
    /// The `x-stream-offset` consumer argument.
    fn argument(&self) -> AMQPValue {
        match self {
            Self::First => AMQPValue::LongString(LongString::from("first")),
            Self::Last => AMQPValue::LongString(LongString::from("last")),
            Self::Next => AMQPValue::LongString(LongString::from("next")),
            Self::Offset(offset) => {
                AMQPValue::LongLongInt(i64::try_from(*offset).unwrap_or(i64::MAX))
            }
            // The broker attaches at the first chunk from this second on (it may
            // hold a few earlier events: the reader drops those by their `at`).
            Self::Time(time) => {
                AMQPValue::Timestamp(u64::try_from(time.timestamp()).unwrap_or_default())
            }
        }
    }
}

/// One event of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// Position in the stream: one more than the event before it.
    pub offset: u64,
    /// The event's routing key (`message.accepted`, `scaler.scaled`, …).
    pub routing_key: String,
    /// The event's JSON body (`Value::Null` for a body that is not JSON).
    pub event: Value,
}

impl LogEntry {
    /// The event's `at` field, when it has one.
    pub fn at(&self) -> Option<DateTime<Utc>> {
        let at = self.event.get("at")?.as_str()?;
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Why reading the log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {EVENTS_LOG_QUEUE:?}: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(
        "{EVENTS_LOG_QUEUE:?} is not a stream (its deliveries carry no x-stream-offset): it is the \
         unbounded queue of an earlier version; replace it with `warren-events migrate`"
    )]
    NotAStream,
}

/// A consumer on the events log, positioned by [`StartAt`].
pub struct EventsLogReader {
    channel: Channel,
    consumer: Consumer,
    since: Option<DateTime<Utc>>,
}

impl EventsLogReader {
    /// Attaches to the log. `prefetch` bounds the events in flight.
    pub async fn open(
        connection: &Connection,
        start: &StartAt,
        prefetch: u16,
    ) -> Result<Self, ReadError> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), start.argument());
        let consumer = channel
            .basic_consume(
                ShortString::from(EVENTS_LOG_QUEUE),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await
            .map_err(|err| {
                // RabbitMQ 3.10 refuses x-stream-offset on a classic queue.
                if is_precondition_failed(&err) && err.to_string().contains("x-stream-offset") {
                    ReadError::NotAStream
                } else {
                    ReadError::Amqp(err)
                }
            })?;
        let since = match start {
            StartAt::Time(time) => Some(*time),
            _ => None,
        };
        Ok(Self {
            channel,
            consumer,
            since,
        })
    }

    /// The next event; waits as long as it takes (following the log live).
    /// `None` when the consumer was cancelled or the connection closed.
    pub async fn next(&mut self) -> Option<Result<LogEntry, ReadError>> {
        loop {
            let delivery = match self.consumer.next().await? {
                Ok(delivery) => delivery,
                Err(err) => return Some(Err(err.into())),
            };
            let offset = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| headers.inner().get(&ShortString::from("x-stream-offset")))
                .and_then(as_offset);
            let Some(offset) = offset else {
                // Not a stream: give every unacked message back and stop.
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await;
                let _ = self.channel.close(200, "not a stream".into()).await;
                return Some(Err(ReadError::NotAStream));
            };
            if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
                return Some(Err(err.into()));
            }
            let entry = LogEntry {
                offset,
                routing_key: delivery.routing_key.as_str().to_string(),
                event: serde_json::from_slice(&delivery.data).unwrap_or(Value::Null),
            };
            if let (Some(since), Some(at)) = (self.since, entry.at())
                && at < since
            {
                continue;
            }
            return Some(Ok(entry));
        }
    }

    /// The next event, or `Ok(None)` when none arrives within `idle`: the
    /// reader has caught up with the log.
    pub async fn next_within(&mut self, idle: Duration) -> Result<Option<LogEntry>, ReadError> {
        match tokio::time::timeout(idle, self.next()).await {
            Ok(Some(result)) => result.map(Some),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// Detaches (the log is unchanged).
    pub async fn close(self) {
        let _ = self.channel.close(200, "reader done".into()).await;
    }
}

fn as_offset(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// Every retained event from `start` on, in order: reads until no event
/// arrives for `idle` (or `limit` events were read).
pub async fn read_retained(
    connection: &Connection,
    start: &StartAt,
    idle: Duration,
    limit: Option<usize>,
) -> Result<Vec<LogEntry>, ReadError> {
    let mut reader = EventsLogReader::open(connection, start, 500).await?;
    let mut entries = Vec::new();
    while limit.is_none_or(|limit| entries.len() < limit) {
        match reader.next_within(idle).await? {
            Some(entry) => entries.push(entry),
            None => break,
        }
    }
    reader.close().await;
    Ok(entries)
}

/// Reads from `start` until an event satisfies `matches` (returned) or
/// `timeout` passes (`Ok(None)`), following the log live once caught up.
pub async fn find(
    connection: &Connection,
    start: &StartAt,
    timeout: Duration,
    mut matches: impl FnMut(&LogEntry) -> bool,
) -> Result<Option<LogEntry>, ReadError> {
    let mut reader = EventsLogReader::open(connection, start, 500).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let found = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match reader.next_within(left).await? {
            Some(entry) if matches(&entry) => break Some(entry),
            Some(_) => {}
            None => break None,
        }
    };
    reader.close().await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse() {
        assert_eq!("first".parse(), Ok(StartAt::First));
        assert_eq!("last".parse(), Ok(StartAt::Last));
        assert_eq!("next".parse(), Ok(StartAt::Next));
        assert_eq!("42".parse(), Ok(StartAt::Offset(42)));
        let at = "2026-11-29T23:00:00Z".parse::<StartAt>();
        assert_eq!(
            at,
            Ok(StartAt::Time(
                DateTime::parse_from_rfc3339("2026-11-29T23:00:00Z")
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_default()
            ))
        );
        let Ok(StartAt::Time(ago)) = "15m".parse::<StartAt>() else {
            panic!("15m is a duration ago");
        };
        let expected = Utc::now() - chrono::Duration::minutes(15);
        assert!((ago - expected).num_seconds().abs() <= 2);
        for bad in ["", "yesterday", "15x", "-3m", "m"] {
            assert!(bad.parse::<StartAt>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn start_positions_become_stream_offsets() {
        assert_eq!(
            StartAt::First.argument(),
            AMQPValue::LongString("first".into())
        );
        assert_eq!(StartAt::Offset(7).argument(), AMQPValue::LongLongInt(7));
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        assert_eq!(
            StartAt::Time(at).argument(),
            AMQPValue::Timestamp(1_700_000_000)
        );
    }
}

//! Audit events on the `warren.events` topic exchange.
//!
//! Emitting is a non-blocking `try_send` into a bounded buffer; a background
//! task publishes the events on a plain (no-confirm) channel. The sink owns
//! the slot for that channel: whoever owns the connection hands it a channel
//! with [`AuditSink::attach`] and takes it back with [`AuditSink::detach`].
//! When the buffer is full or no connected channel is attached, the event is
//! dropped and counted: an audit event never blocks, slows or fails a job.
//!
//! Batching ([`AuditSink::spawn_batched`]): events of one kind (routing key)
//! are gathered and published as ONE broker message per batch, so a worker
//! doing thousands of jobs a second costs the broker a few messages a second,
//! not one per job. A batch goes out when it holds `max_events` events, when
//! its oldest event is `linger` old, or on [`AuditSink::flush`]. Its body is
//! `{"event": <kind>, "count": n, "batch": [<event>, ...]}`, each element the
//! same object a single event would have been; [`events_in`] turns either
//! shape into the list of events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use crate::topology::EVENTS_EXCHANGE;

/// The events an audit message body carries: the elements of its `batch`
/// array when it is a batch, else the body itself.
pub fn events_in(body: Value) -> Vec<Value> {
    match body {
        Value::Object(mut object) if object.get("batch").is_some_and(Value::is_array) => {
            match object.remove("batch") {
                Some(Value::Array(events)) => events,
                _ => Vec::new(),
            }
        }
        other => vec![other],
    }
}

/// How a batched sink groups events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Events per broker message at most (1: one message per event, unwrapped).
    pub max_events: usize,
    /// How long the oldest event of a batch may wait before it is published.
    pub linger: Duration,
}

enum Command {
    Event(AuditEvent),
    Job(JobEvent),
    Flush(oneshot::Sender<()>),
}

/// One audit event: a routing key (`message.accepted`, …) and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub routing_key: String,
    pub body: Value,
}

impl AuditEvent {
    /// An event about job `id`, stamped now, with extra `fields`.
    pub fn job(routing_key: &str, id: &str, fields: Map<String, Value>) -> Self {
        let mut body = json!({
            "event": routing_key,
            "id": id,
            "at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        if let Some(object) = body.as_object_mut() {
            for (key, value) in fields {
                object.entry(key).or_insert(value);
            }
        }
        Self {
            routing_key: routing_key.to_string(),
            body,
        }
    }
}

/// An event about one job in one queue, for the hot path: the same JSON
/// object as [`AuditEvent::job`] with a single `queue` field, but written
/// straight to bytes by the publishing task (no `serde_json::Value` built
/// per event). A sender emits one for every accepted job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub routing_key: &'static str,
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub queue: Arc<str>,
}

impl JobEvent {
    /// An event about job `id` in `queue`, stamped now.
    pub fn new(routing_key: &'static str, id: Uuid, queue: Arc<str>) -> Self {
        Self {
            routing_key,
            id,
            at: Utc::now(),
            queue,
        }
    }

    /// Appends the event's JSON: `{"at", "event", "id", "queue"}`, keys in
    /// the order a `serde_json::Map` keeps them, so the bytes are those of
    /// the equivalent [`AuditEvent`].
    fn write_json(&self, out: &mut Vec<u8>) {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            at: &'a str,
            event: &'a str,
            id: &'a Uuid,
            queue: &'a str,
        }
        let mut stamp = [0u8; 24];
        let slow;
        let at = match rfc3339_millis(&self.at, &mut stamp) {
            Some(at) => at,
            None => {
                slow = self.at.to_rfc3339_opts(SecondsFormat::Millis, true);
                slow.as_str()
            }
        };
        let json = Json {
            at,
            event: self.routing_key,
            id: &self.id,
            queue: &self.queue,
        };
        // Writing into a Vec cannot fail, and these fields always serialize.
        let _ = serde_json::to_writer(out, &json);
    }
}

/// `at` as `to_rfc3339_opts(SecondsFormat::Millis, true)` writes it
/// (`2026-11-30T15:04:05.123Z`), into `buf` instead of a new `String`; `None`
/// for what that format writes otherwise (years outside 0 – 9999, a leap
/// second).
fn rfc3339_millis<'b>(at: &DateTime<Utc>, buf: &'b mut [u8; 24]) -> Option<&'b str> {
    let year = u32::try_from(at.year()).ok().filter(|year| *year <= 9999)?;
    let nanos = at.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let fields = [
        (year, 0, 4),
        (at.month(), 5, 2),
        (at.day(), 8, 2),
        (at.hour(), 11, 2),
        (at.minute(), 14, 2),
        (at.second(), 17, 2),
        (nanos / 1_000_000, 20, 3),
    ];
    *buf = *b"0000-00-00T00:00:00.000Z";
    for (mut value, start, width) in fields {
        for digit in buf[start..start + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    std::str::from_utf8(buf).ok()
}

/// The sending side. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Command>,
    channel: ChannelSlot,
    dropped: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
}

/// The channel the events go out on, if one is attached.
#[derive(Clone, Default)]
struct ChannelSlot(Arc<Mutex<Option<Channel>>>);

impl ChannelSlot {
    fn set(&self, channel: Option<Channel>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = channel;
    }

    /// The attached channel while it is open.
    fn current(&self) -> Option<Channel> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|channel| channel.status().connected())
    }
}

/// Counters shared by the sink and its publishing task.
#[derive(Clone, Default)]
struct Counts {
    dropped: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
}

impl AuditSink {
    /// Starts the publishing task: one broker message per event. Events are
    /// dropped until a channel is [attached](AuditSink::attach).
    pub fn spawn(capacity: usize) -> Self {
        Self::spawn_batched(
            capacity,
            Batching {
                max_events: 1,
                linger: Duration::ZERO,
            },
        )
    }

    /// Starts the publishing task, publishing events in batches (see the
    /// module documentation).
    pub fn spawn_batched(capacity: usize, batching: Batching) -> Self {
        let (tx, rx) = mpsc::channel::<Command>(capacity.max(1));
        let counts = Counts::default();
        let channel = ChannelSlot::default();
        let sink = Self {
            tx,
            channel: channel.clone(),
            dropped: counts.dropped.clone(),
            published: counts.published.clone(),
        };
        tokio::spawn(publish_loop(rx, batching, channel, counts));
        sink
    }

    /// Publishes on `channel` from now on (a plain channel of the caller's
    /// connection; the exchange must be declared).
    pub fn attach(&self, channel: Channel) {
        self.channel.set(Some(channel));
    }

    /// Stops publishing (the connection is going): events are dropped until
    /// a channel is attached again.
    pub fn detach(&self) {
        self.channel.set(None);
    }

    /// True while an attached channel is open.
    pub fn is_attached(&self) -> bool {
        self.channel.current().is_some()
    }

    /// Queues `event` for publishing; drops it (and counts it) when the
    /// buffer is full.
    pub fn emit(&self, event: AuditEvent) {
        if self.tx.try_send(Command::Event(event)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a [`JobEvent`] (see [`AuditSink::emit`]).
    pub fn emit_job(&self, event: JobEvent) {
        if self.tx.try_send(Command::Job(event)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes every event emitted so far that still waits in a batch;
    /// waits for that at most `timeout`. Call it before closing the
    /// connection on the way out.
    pub async fn flush(&self, timeout: Duration) {
        let (done, wait) = oneshot::channel();
        let flushed = async {
            if self.tx.send(Command::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        };
        let _ = tokio::time::timeout(timeout, flushed).await;
    }

    /// Events dropped so far (buffer full, disconnected, publish error).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events handed to the broker so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

/// Events waiting to be published, per routing key, with the time the
/// oldest of each batch arrived. Each event is kept as its JSON (the
/// batch's elements, comma-separated), written when it is added.
#[derive(Default)]
struct Pending {
    batches: BTreeMap<String, Batch>,
}

/// The events of one batch.
struct Batch {
    first: Instant,
    count: usize,
    /// The events' JSON objects, separated by commas.
    json: Vec<u8>,
}

impl Pending {
    /// Adds an event of kind `routing_key` written by `write`; returns the
    /// key when its batch is now full.
    fn add(
        &mut self,
        routing_key: &str,
        write: impl FnOnce(&mut Vec<u8>),
        max_events: usize,
    ) -> Option<String> {
        // The key is cloned only for a new batch, not for every event.
        if !self.batches.contains_key(routing_key) {
            let batch = Batch {
                first: Instant::now(),
                count: 0,
                json: Vec::new(),
            };
            self.batches.insert(routing_key.to_string(), batch);
        }
        let batch = self.batches.get_mut(routing_key)?;
        if batch.count > 0 {
            batch.json.push(b',');
        }
        write(&mut batch.json);
        batch.count += 1;
        (batch.count >= max_events).then(|| routing_key.to_string())
    }

    /// When the oldest batch is due.
    fn next_due(&self, linger: Duration) -> Option<Instant> {
        self.batches
            .values()
            .map(|batch| batch.first + linger)
            .min()
    }

    /// Takes the batches due at `now` (all of them with `everything`).
    fn take_due(
        &mut self,
        now: Instant,
        linger: Duration,
        everything: bool,
    ) -> Vec<(String, Batch)> {
        let due: Vec<String> = self
            .batches
            .iter()
            .filter(|(_, batch)| everything || batch.first + linger <= now)
            .map(|(key, _)| key.clone())
            .collect();
        due.into_iter()
            .filter_map(|key| self.take(&key).map(|batch| (key, batch)))
            .collect()
    }

    fn take(&mut self, routing_key: &str) -> Option<Batch> {
        self.batches.remove(routing_key)
    }
}

/// A batching sink gathers events this long between wake-ups, so a busy
/// sender or worker wakes the publishing task a few hundred times a second
/// instead of once per event (events wait in the channel meanwhile).
const GATHER: Duration = Duration::from_millis(5);

async fn publish_loop(
    mut rx: mpsc::Receiver<Command>,
    batching: Batching,
    slot: ChannelSlot,
    counts: Counts,
) {
    let channel = || slot.current();
    let max_events = batching.max_events.max(1);
    let gather = if max_events > 1 {
        GATHER.min(batching.linger)
    } else {
        Duration::ZERO
    };
    let mut pending = Pending::default();
    loop {
        let due = pending.next_due(batching.linger);
        let command = tokio::select! {
            command = rx.recv() => command,
            _ = sleep_until(due) => {
                for (key, batch) in pending.take_due(Instant::now(), batching.linger, false) {
                    publish(channel(), &key, batch, max_events, &counts).await;
                }
                continue;
            }
        };
        // Everything already waiting is handled in this wake-up.
        let mut next = command;
        if next.is_none() {
            break;
        }
        while let Some(command) = next {
            match command {
                Command::Event(event) => {
                    let write = |out: &mut Vec<u8>| {
                        // Writing a Value into a Vec cannot fail.
                        let _ = serde_json::to_writer(out, &event.body);
                    };
                    if let Some(key) = pending.add(&event.routing_key, write, max_events)
                        && let Some(batch) = pending.take(&key)
                    {
                        publish(channel(), &key, batch, max_events, &counts).await;
                    }
                }
                Command::Job(event) => {
                    let write = |out: &mut Vec<u8>| event.write_json(out);
                    if let Some(key) = pending.add(event.routing_key, write, max_events)
                        && let Some(batch) = pending.take(&key)
                    {
                        publish(channel(), &key, batch, max_events, &counts).await;
                    }
                }
                Command::Flush(done) => {
                    for (key, batch) in pending.take_due(Instant::now(), batching.linger, true) {
                        publish(channel(), &key, batch, max_events, &counts).await;
                    }
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        if !gather.is_zero() {
            tokio::time::sleep(gather).await;
        }
    }
    for (key, batch) in pending.take_due(Instant::now(), batching.linger, true) {
        publish(channel(), &key, batch, max_events, &counts).await;
    }
}

/// Sleeps until `due`, or forever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The body of one broker message carrying `batch`'s events of kind
/// `routing_key`: `{"batch": [...], "count": n, "event": <kind>}` (the
/// bytes `serde_json` writes for that object), or the bare event when the
/// sink does not batch.
fn batch_body(routing_key: &str, batch: Batch, max_events: usize) -> Vec<u8> {
    if max_events == 1 && batch.count == 1 {
        return batch.json;
    }
    let mut body = Vec::with_capacity(batch.json.len() + routing_key.len() + 48);
    body.extend_from_slice(b"{\"batch\":[");
    body.extend_from_slice(&batch.json);
    body.extend_from_slice(b"],\"count\":");
    body.extend_from_slice(batch.count.to_string().as_bytes());
    body.extend_from_slice(b",\"event\":");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, routing_key);
    body.push(b'}');
    body
}

/// Publishes one message; counts its events as published or dropped.
async fn publish(
    channel: Option<Channel>,
    routing_key: &str,
    batch: Batch,
    max_events: usize,
    counts: &Counts,
) {
    let n = batch.count as u64;
    let Some(channel) = channel else {
        counts.dropped.fetch_add(n, Ordering::Relaxed);
        return;
    };
    let body = batch_body(routing_key, batch, max_events);
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    let result = channel
        .basic_publish(
            ShortString::from(EVENTS_EXCHANGE),
            ShortString::from(routing_key),
            BasicPublishOptions::default(),
            &body,
            properties,
        )
        .await;
    match result {
        Ok(_) => {
            counts.published.fetch_add(n, Ordering::Relaxed);
        }
        Err(err) => {
            counts.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(error = %err, events = n, "audit events dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_events_carry_id_time_and_fields_without_overriding() {
        let mut fields = Map::new();
        fields.insert("worker".into(), json!("pod-a"));
        fields.insert("id".into(), json!("spoofed"));
        let event = AuditEvent::job("message.processed", "abc", fields);
        assert_eq!(event.routing_key, "message.processed");
        assert_eq!(event.body["id"], "abc");
        assert_eq!(event.body["worker"], "pod-a");
        assert_eq!(event.body["event"], "message.processed");
        assert!(event.body["at"].as_str().unwrap().ends_with('Z'));
    }

    #[tokio::test]
    async fn emitting_never_blocks_when_disconnected_or_full() {
        let sink = AuditSink::spawn(2);
        assert!(!sink.is_attached(), "no channel until one is attached");
        for i in 0..100 {
            sink.emit(AuditEvent::job(
                "message.accepted",
                &i.to_string(),
                Map::new(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(sink.dropped(), 100);
        assert_eq!(sink.published(), 0);
    }

    fn event(kind: &str, id: usize) -> AuditEvent {
        AuditEvent::job(kind, &id.to_string(), Map::new())
    }

    #[test]
    fn batches_fill_per_kind_and_come_due_after_the_linger() {
        let mut pending = Pending::default();
        let linger = Duration::from_millis(100);
        assert_eq!(pending.next_due(linger), None);
        assert_eq!(add(&mut pending, event("message.processed", 1), 3), None);
        assert_eq!(
            add(&mut pending, event("message.dead_lettered", 2), 3),
            None
        );
        assert_eq!(add(&mut pending, event("message.processed", 3), 3), None);
        assert_eq!(
            add(&mut pending, event("message.processed", 4), 3).as_deref(),
            Some("message.processed")
        );
        let full = pending.take("message.processed").unwrap();
        let events = events_in(body_of("message.processed", full, 3));
        let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["1", "3", "4"]);

        let due = pending.next_due(linger).unwrap();
        assert!(
            pending
                .take_due(due - Duration::from_millis(1), linger, false)
                .is_empty()
        );
        let taken = pending.take_due(due, linger, false);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, "message.dead_lettered");
        assert_eq!(pending.next_due(linger), None);
    }

    /// Adds an [`AuditEvent`] the way the publishing task does.
    fn add(pending: &mut Pending, event: AuditEvent, max_events: usize) -> Option<String> {
        let write = |out: &mut Vec<u8>| serde_json::to_writer(out, &event.body).unwrap();
        pending.add(&event.routing_key, write, max_events)
    }

    /// The batch of `events` (one kind) as the publishing task would send it.
    fn batch_of(events: &[AuditEvent], max_events: usize) -> Vec<u8> {
        let mut pending = Pending::default();
        for event in events {
            add(&mut pending, event.clone(), usize::MAX);
        }
        let key = &events[0].routing_key;
        batch_body(key, pending.take(key).unwrap(), max_events)
    }

    fn body_of(routing_key: &str, batch: Batch, max_events: usize) -> Value {
        serde_json::from_slice(&batch_body(routing_key, batch, max_events)).unwrap()
    }

    #[test]
    fn a_batch_body_unpacks_to_its_events_and_a_single_event_to_itself() {
        let events = vec![event("message.processed", 1), event("message.processed", 2)];
        let bodies: Vec<Value> = events.iter().map(|e| e.body.clone()).collect();
        let bytes = batch_of(&events, 100);
        // The bytes serde_json writes for the object (keys sorted).
        let expected = json!({
            "event": "message.processed",
            "count": 2,
            "batch": bodies,
        });
        assert_eq!(bytes, serde_json::to_vec(&expected).unwrap());
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["event"], "message.processed");
        assert_eq!(body["count"], 2);
        assert_eq!(events_in(body), bodies);

        let single = event("message.accepted", 7);
        let bytes = batch_of(std::slice::from_ref(&single), 1);
        assert_eq!(
            bytes,
            serde_json::to_vec(&single.body).unwrap(),
            "unbatched sinks publish the bare event"
        );
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(events_in(body), vec![single.body]);
    }

    #[test]
    fn a_job_event_writes_what_the_audit_event_writes() {
        let id = Uuid::new_v4();
        let queue: Arc<str> = Arc::from("jobs \"quoted\" \u{e9}");
        let event = JobEvent::new("message.accepted", id, queue.clone());
        let mut fields = Map::new();
        fields.insert("queue".into(), Value::String(queue.to_string()));
        let mut expected = AuditEvent::job("message.accepted", &id.to_string(), fields);
        expected.body["at"] = Value::String(event.at.to_rfc3339_opts(SecondsFormat::Millis, true));
        let mut written = Vec::new();
        event.write_json(&mut written);
        assert_eq!(written, serde_json::to_vec(&expected.body).unwrap());

        // Mixed in a batch with other events of its kind, it unpacks the same.
        let mut pending = Pending::default();
        add(&mut pending, expected.clone(), 10);
        pending.add("message.accepted", |out| event.write_json(out), 10);
        let body = body_of(
            "message.accepted",
            pending.take("message.accepted").unwrap(),
            10,
        );
        assert_eq!(body["count"], 2);
        assert_eq!(events_in(body), vec![expected.body.clone(), expected.body]);
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        use chrono::TimeZone;
        let chrono = |at: DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut buf = [0u8; 24];
        // Every field's edges, then a walk of odd steps over years 0 – 9999.
        for (y, mo, d, h, mi, s, ms) in [
            (0, 1, 1, 0, 0, 0, 0),
            (9, 2, 3, 4, 5, 6, 7),
            (2026, 11, 30, 15, 4, 5, 123),
            (2024, 2, 29, 23, 59, 59, 999),
            (9999, 12, 31, 23, 59, 59, 999),
        ] {
            let at = Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
                + chrono::Duration::milliseconds(ms)
                + chrono::Duration::nanoseconds(999_999);
            assert_eq!(rfc3339_millis(&at, &mut buf), Some(chrono(at).as_str()));
        }
        let mut at = Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap();
        let mut walked = 0;
        while at.year() <= 9999 {
            assert_eq!(rfc3339_millis(&at, &mut buf), Some(chrono(at).as_str()));
            // About five years, in odd milliseconds.
            at += chrono::Duration::milliseconds(157_784_630_123);
            walked += 1;
        }
        assert!(walked > 1900, "{walked}");
        // What the short path does not write goes through chrono.
        let far = Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap();
        let before = Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap();
        let leap = Utc
            .with_ymd_and_hms(2016, 12, 31, 23, 59, 59)
            .unwrap()
            .with_nanosecond(1_500_000_000)
            .unwrap();
        for at in [far, before, leap] {
            assert_eq!(rfc3339_millis(&at, &mut buf), None, "{}", chrono(at));
            let event = JobEvent {
                routing_key: "message.accepted",
                id: Uuid::nil(),
                at,
                queue: Arc::from("q"),
            };
            let mut written = Vec::new();
            event.write_json(&mut written);
            let json: Value = serde_json::from_slice(&written).unwrap();
            assert_eq!(json["at"], chrono(at));
        }
    }

    #[tokio::test]
    async fn flush_publishes_waiting_batches_at_once() {
        // No channel: a flushed batch is counted as dropped, which shows it
        // left the buffer without waiting for the (long) linger.
        let sink = AuditSink::spawn_batched(
            100,
            Batching {
                max_events: 50,
                linger: Duration::from_secs(3600),
            },
        );
        for i in 0..5 {
            sink.emit(event("message.processed", i));
        }
        // Job events (written straight to JSON) wait in their batch alike.
        for _ in 0..3 {
            let queue = Arc::from("q");
            sink.emit_job(JobEvent::new("message.accepted", Uuid::new_v4(), queue));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sink.dropped(), 0, "still waiting in the batch");
        sink.flush(Duration::from_secs(5)).await;
        assert_eq!(sink.dropped(), 8);
    }
}

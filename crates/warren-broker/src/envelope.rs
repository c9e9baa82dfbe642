//! The job envelope: the JSON body of every message on a work queue.
//!
//! `{"v":1,"id":"<uuid>","message":"...","created_at":"<RFC 3339>", ...extra}`.
//! Extra fields sent by a client (seed 004's `phone`, say) are carried as-is.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// Field names the envelope owns; a client cannot override them with extras.
pub const RESERVED_FIELDS: [&str; 4] = ["v", "id", "message", "created_at"];

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version.
    pub v: u32,
    /// The job id, also the AMQP `message_id`.
    pub id: Uuid,
    /// The work to do (one simulated second per dot).
    pub message: String,
    /// When the sender accepted the job.
    pub created_at: DateTime<Utc>,
    /// Any other fields the client sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Why a message body is not a job this build can process.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message body is not a valid job envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported envelope version {found} (this build reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion { found: u32 },
}

impl Envelope {
    /// A new job with a fresh UUID v4 id, stamped now. Reserved names in
    /// `extra` are dropped.
    pub fn new(message: impl Into<String>, mut extra: Map<String, Value>) -> Self {
        for reserved in RESERVED_FIELDS {
            extra.remove(reserved);
        }
        Self {
            v: ENVELOPE_VERSION,
            id: Uuid::new_v4(),
            message: message.into(),
            created_at: Utc::now(),
            extra,
        }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings, numbers and a JSON map cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a body, rejecting other versions.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Envelope = serde_json::from_slice(bytes)?;
        if envelope.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion { found: envelope.v });
        }
        Ok(envelope)
    }

    /// The AMQP properties a job is published with: persistent
    /// (`delivery_mode` 2), JSON, `message_id` = the job id, `timestamp` =
    /// `created_at` (Unix seconds), `app_id` = the publishing program.
    pub fn publish_properties(&self, app_id: &str) -> BasicProperties {
        publish_properties(self.id, self.created_at, app_id)
    }

    /// `created_at` as RFC 3339 with milliseconds (for logs and events).
    pub fn created_at_rfc3339(&self) -> String {
        self.created_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// The number of dots in the message: the seconds of simulated work.
    pub fn dots(&self) -> usize {
        self.message.matches('.').count()
    }
}

fn publish_properties(id: Uuid, created_at: DateTime<Utc>, app_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(id.to_string()))
        .with_timestamp(u64::try_from(created_at.timestamp()).unwrap_or(0))
        .with_app_id(ShortString::from(app_id))
}

/// A new job that borrows its message and extra fields: what a sender
/// publishes, written without copying them into an [`Envelope`]. Its JSON
/// is byte for byte what [`Envelope::new`] with the same id and time would
/// write (reserved names in `extra` are left out the same way).
#[derive(Debug, Serialize)]
pub struct NewJob<'a> {
    v: u32,
    /// The job id, also the AMQP `message_id`.
    pub id: Uuid,
    message: &'a str,
    /// When the sender accepted the job.
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    extra: Extra<'a>,
}

/// Extra fields without the reserved names.
#[derive(Debug)]
struct Extra<'a>(&'a Map<String, Value>);

impl Serialize for Extra<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .filter(|(key, _)| !RESERVED_FIELDS.contains(&key.as_str())),
        )
    }
}

impl<'a> NewJob<'a> {
    /// A new job with a fresh UUID v4 id, stamped now.
    pub fn new(message: &'a str, extra: &'a Map<String, Value>) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            id: Uuid::new_v4(),
            message,
            created_at: Utc::now(),
            extra: Extra(extra),
        }
    }

    /// The JSON body, in one buffer sized for it up front.
    pub fn to_bytes(&self) -> Vec<u8> {
        // The fixed fields take about 120 bytes; the message and extras the rest.
        let mut bytes = Vec::with_capacity(160 + self.message.len() * 9 / 8);
        // Writing strings, numbers and JSON values to a Vec cannot fail.
        if serde_json::to_writer(&mut bytes, self).is_err() {
            bytes.clear();
        }
        bytes
    }

    /// The AMQP properties, as [`Envelope::publish_properties`].
    pub fn publish_properties(&self, app_id: &str) -> BasicProperties {
        publish_properties(self.id, self.created_at, app_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_with_extra_fields() {
        let extra = json!({"phone": "+34 600 000 000", "id": "spoofed", "v": 7})
            .as_object()
            .cloned()
            .unwrap();
        let envelope = Envelope::new("Hello...", extra);
        let bytes = envelope.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["message"], "Hello...");
        assert_eq!(value["phone"], "+34 600 000 000");
        assert_eq!(
            value["id"],
            envelope.id.to_string(),
            "extras cannot override the id"
        );
        let parsed = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(parsed, envelope);
        assert_eq!(parsed.dots(), 3);
    }

    #[test]
    fn a_job_is_published_persistent_with_its_id_and_time() {
        let envelope = Envelope::new("work.", Map::new());
        let properties = envelope.publish_properties("warren-sender");
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.to_string()),
            Some(envelope.id.to_string())
        );
        assert_eq!(
            properties.content_type().as_ref().map(|t| t.to_string()),
            Some("application/json".to_string())
        );
        assert_eq!(
            properties.timestamp(),
            &Some(envelope.created_at.timestamp() as u64)
        );
        assert_eq!(
            properties.app_id().as_ref().map(|a| a.to_string()),
            Some("warren-sender".to_string())
        );
    }

    #[test]
    fn a_new_job_writes_what_the_envelope_writes() {
        let extra = json!({"phone": "+34 600", "id": "spoofed", "created_at": 0, "n": [1.5, {"a": null}], "message": "no"})
            .as_object()
            .cloned()
            .unwrap();
        let job = NewJob::new("Hello \"world\"...", &extra);
        let bytes = job.to_bytes();
        let mut envelope = Envelope::new("Hello \"world\"...", extra.clone());
        envelope.id = job.id;
        envelope.created_at = job.created_at;
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            String::from_utf8(envelope.to_bytes()).unwrap()
        );
        let decoded = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, envelope);
        assert_eq!(decoded.extra.get("phone"), Some(&json!("+34 600")));
        assert!(!decoded.extra.contains_key("created_at"));
        assert_eq!(
            job.publish_properties("warren-sender"),
            envelope.publish_properties("warren-sender")
        );
    }

    #[test]
    fn rejects_garbage_and_other_versions() {
        assert!(matches!(
            Envelope::from_bytes(b"not json"),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::from_bytes(br#"{"v":1,"message":"x"}"#),
            Err(EnvelopeError::Malformed(_))
        ));
        let mut value = serde_json::to_value(Envelope::new("x", Map::new())).unwrap();
        value["v"] = json!(2);
        let err = Envelope::from_bytes(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(matches!(
            err,
            EnvelopeError::UnsupportedVersion { found: 2 }
        ));
    }
}

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
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_timestamp(u64::try_from(self.created_at.timestamp()).unwrap_or(0))
            .with_app_id(ShortString::from(app_id))
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

//! What the sender accepts: pure functions from request parts to a job or a
//! client error. No I/O here.

use std::borrow::Cow;
use std::fmt;

use axum::http::StatusCode;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A client error: HTTP status, a machine-readable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }
}

/// The seed's dot rule, configurable: a message may contain at most
/// `max_dots` dots, or exactly one of `also_allowed` counts. Disabled, any
/// number of dots is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotRule {
    pub enabled: bool,
    pub max_dots: usize,
    pub also_allowed: Vec<usize>,
}

impl Default for DotRule {
    /// Seed 000, 5.5.1: at most 5 dots, or exactly 30 or 40.
    fn default() -> Self {
        Self {
            enabled: true,
            max_dots: 5,
            also_allowed: vec![30, 40],
        }
    }
}

impl DotRule {
    /// Whether a message with `dots` dots is accepted.
    pub fn allows(&self, dots: usize) -> bool {
        !self.enabled || dots <= self.max_dots || self.also_allowed.contains(&dots)
    }

    fn describe(&self) -> String {
        let also: Vec<String> = self.also_allowed.iter().map(|n| n.to_string()).collect();
        if also.is_empty() {
            format!("at most {}", self.max_dots)
        } else {
            format!(
                "at most {}, or exactly {}",
                self.max_dots,
                also.join(" or ")
            )
        }
    }
}

/// A valid job request: the message (borrowed from the body when it has
/// no escapes) and any extra fields to carry.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest<'a> {
    pub message: Cow<'a, str>,
    pub extra: Map<String, Value>,
}

/// Whether `content_type` is JSON (`application/json` or `application/*+json`,
/// any parameters).
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return false;
    };
    // Compared without regard to ASCII case, without a lowercased copy.
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .as_bytes();
    const PREFIX: &[u8] = b"application/";
    const SUFFIX: &[u8] = b"+json";
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= PREFIX.len() + SUFFIX.len()
            && essence[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
            && essence[essence.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
}

/// Validates a request to send a job.
pub fn parse_job<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
    rule: &DotRule,
) -> Result<JobRequest<'a>, Rejection> {
    if !is_json_content_type(content_type) {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body must be JSON (Content-Type: application/json), got {}",
                content_type.unwrap_or("no Content-Type")
            ),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "missing_message",
            "the request has no body; send {\"message\": \"...\"}",
        ));
    }
    let read: BodyRead<'_> = serde_json::from_slice(body).map_err(|err| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {err}"),
        )
    })?;
    let BodyRead::Object { message, extra } = read else {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "not_an_object",
            "the body must be a JSON object such as {\"message\": \"...\"}",
        ));
    };
    let message = match message {
        Field::Missing => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "missing_message",
                "the field \"message\" is required",
            ));
        }
        Field::Text(message) => message,
        Field::Other(kind) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "message_not_string",
                format!("\"message\" must be a string, got {kind}"),
            ));
        }
    };
    if message.trim().is_empty() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "blank_message",
            "\"message\" must not be empty or only whitespace",
        ));
    }
    let dots = message.matches('.').count();
    if !rule.allows(dots) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "dot_rule",
            format!(
                "the message has {dots} dots; {} are accepted",
                rule.describe()
            ),
        ));
    }
    Ok(JobRequest { message, extra })
}

/// A request body as [`parse_job`] reads it, in one pass and without an
/// intermediate [`Value`] for the whole body: the `message` field kept
/// apart (borrowed when it needs no unescaping), every other field read
/// into a [`Value`] exactly as `serde_json::from_slice::<Value>` would
/// (duplicate keys: the last one wins; numbers parsed and range-checked
/// the same way).
enum BodyRead<'a> {
    Object {
        message: Field<'a>,
        extra: Map<String, Value>,
    },
    /// Valid JSON, but not an object.
    NotAnObject,
}

/// The `message` field as read.
enum Field<'a> {
    /// Absent or `null`.
    Missing,
    Text(Cow<'a, str>),
    /// Any other JSON type, named for the error.
    Other(&'static str),
}

impl<'de> Deserialize<'de> for BodyRead<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = BodyRead<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut message = Field::Missing;
        let mut extra = Map::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "message" {
                message = map.next_value::<Field<'de>>()?;
            } else {
                let value = map.next_value::<Value>()?;
                extra.insert(key.into_owned(), value);
            }
        }
        Ok(BodyRead::Object { message, extra })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        consume_seq(seq)?;
        Ok(BodyRead::NotAnObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BodyRead::NotAnObject)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(text.to_string())))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Field::Text(Cow::Owned(text)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Missing)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other("a number"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        consume_seq(seq)?;
        Ok(Field::Other("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // Read as a Value would be, so that what is malformed for one is
        // malformed for the other (e.g. a number out of range inside).
        while map.next_entry::<Cow<'de, str>, Value>()?.is_some() {}
        Ok(Field::Other("an object"))
    }
}

/// Reads an array's elements as [`Value`]s would be read (and drops them).
fn consume_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Value>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn code<'a>(content_type: Option<&str>, body: &'a str) -> Result<JobRequest<'a>, &'static str> {
        parse_job(content_type, body.as_bytes(), &DotRule::default()).map_err(|r| r.code)
    }

    #[test]
    fn accepts_the_seed_examples() {
        let job = code(JSON, r#"{"message": "Hello RabbitMQ!....."}"#).unwrap();
        assert_eq!(job.message, "Hello RabbitMQ!.....");
        assert!(job.extra.is_empty());
        let thirty = format!(r#"{{"message": "x{}"}}"#, ".".repeat(30));
        let forty = format!(r#"{{"message": "x{}"}}"#, ".".repeat(40));
        assert!(code(JSON, &thirty).is_ok());
        assert!(code(JSON, &forty).is_ok());
        assert!(
            code(
                Some("application/json; charset=utf-8"),
                r#"{"message":"a"}"#
            )
            .is_ok()
        );
        assert!(code(Some("application/vnd.warren+json"), r#"{"message":"a"}"#).is_ok());
    }

    #[test]
    fn json_content_types_are_matched_without_regard_to_case() {
        for json in [
            "application/json",
            "Application/JSON",
            " APPLICATION/JSON ; charset=UTF-8",
            "application/vnd.warren+json",
            "APPLICATION/VND.WARREN+JSON",
            "application/+json",
        ] {
            assert!(is_json_content_type(Some(json)), "{json}");
        }
        for other in [
            "",
            "text/json",
            "application/jso",
            "application/json+",
            "application/json-seq",
            "application+json",
            "text/plain; x=application/json",
            "applicatión/json",
            "application/vnd.x+jsón",
        ] {
            assert!(!is_json_content_type(Some(other)), "{other}");
        }
        assert!(!is_json_content_type(None));
    }

    #[test]
    fn the_dot_rule_rejects_6_to_29_31_to_39_and_over_40() {
        for dots in [6, 10, 29, 31, 39, 41, 100] {
            let body = format!(r#"{{"message": "Hello{}"}}"#, ".".repeat(dots));
            assert_eq!(code(JSON, &body).unwrap_err(), "dot_rule", "{dots} dots");
        }
        for dots in [0, 1, 5, 30, 40] {
            let body = format!(r#"{{"message": "Hello{}"}}"#, ".".repeat(dots));
            assert!(code(JSON, &body).is_ok(), "{dots} dots");
        }
        let off = DotRule {
            enabled: false,
            ..DotRule::default()
        };
        assert!(off.allows(17));
    }

    #[test]
    fn rejects_bad_requests_with_their_codes() {
        assert_eq!(code(JSON, "").unwrap_err(), "missing_message");
        assert_eq!(code(JSON, "  \n").unwrap_err(), "missing_message");
        assert_eq!(code(JSON, "{}").unwrap_err(), "missing_message");
        assert_eq!(
            code(JSON, r#"{"message": null}"#).unwrap_err(),
            "missing_message"
        );
        assert_eq!(
            code(JSON, r#"{"message": "   "}"#).unwrap_err(),
            "blank_message"
        );
        assert_eq!(
            code(JSON, r#"{"message": 42}"#).unwrap_err(),
            "message_not_string"
        );
        assert_eq!(
            code(JSON, r#"{"message": ["a"]}"#).unwrap_err(),
            "message_not_string"
        );
        assert_eq!(
            code(JSON, r#"{"message": "a""#).unwrap_err(),
            "malformed_json"
        );
        assert_eq!(code(JSON, r#"["message"]"#).unwrap_err(), "not_an_object");
        assert_eq!(
            code(None, r#"{"message":"a"}"#).unwrap_err(),
            "unsupported_media_type"
        );
        assert_eq!(
            code(Some("text/plain"), r#"{"message":"a"}"#).unwrap_err(),
            "unsupported_media_type"
        );
        let rejection = parse_job(Some("text/plain"), b"x", &DotRule::default()).unwrap_err();
        assert_eq!(rejection.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn extra_fields_are_kept() {
        let job = code(JSON, r#"{"message": "hi", "phone": "600", "priority": 3}"#).unwrap();
        assert_eq!(job.extra["phone"], "600");
        assert_eq!(job.extra["priority"], 3);
        assert!(!job.extra.contains_key("message"));
    }

    /// What the worker decodes from the envelope the sender would publish for `body`.
    fn through_the_queue(body: &str) -> (JobRequest<'_>, warren_broker::Envelope) {
        let job = parse_job(JSON, body.as_bytes(), &DotRule::default())
            .unwrap_or_else(|rejection| panic!("{body} rejected: {rejection:?}"));
        let sent = warren_broker::Envelope::new(job.message.clone(), job.extra.clone());
        let decoded = warren_broker::Envelope::from_bytes(&sent.to_bytes())
            .unwrap_or_else(|err| panic!("{body}: the worker cannot decode it: {err}"));
        assert_eq!(
            decoded, sent,
            "{body}: the job changed on its way to the worker"
        );
        assert_eq!(decoded.extra, job.extra, "{body}: extra fields changed");
        (job, decoded)
    }

    /// Found by `make fuzz` (send_request): serde_json's default float parser
    /// is not correctly rounded, so parse → print → parse changed this number
    /// (2.2222226262222225e20 in the sender, ...222e20 in the worker).
    #[test]
    fn fuzz_regression_a_float_in_an_extra_field_reaches_the_worker_unchanged() {
        let body =
            r#"{"message": "x.....2.................+........", "phone":222222262622222222222.5}"#;
        let (job, decoded) = through_the_queue(body);
        let expected: f64 = "222222262622222222222.5".parse().unwrap();
        assert_eq!(job.extra["phone"].as_f64(), Some(expected));
        assert_eq!(decoded.extra["phone"].as_f64(), Some(expected));
    }

    #[test]
    fn awkward_numbers_reach_the_worker_as_the_sender_read_them() {
        let floats = [
            "0.1",
            "0.30000000000000004",
            "1e23",
            "8.98846567431158e307",
            "1.7976931348623157e308",
            "2.2250738585072011e-308",
            "2.2250738585072014e-308",
            "4.9406564584124654e-324",
            "5e-324",
            "9007199254740993.0",
            "123456789.123456789e-5",
            "-222222262622222222222.5",
            "7.0e-10",
            "3.141592653589793238462643383279",
        ];
        // A small deterministic generator adds long decimal literals near the
        // edge of what an f64 holds (where fast parsers round wrongly).
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut generated = Vec::new();
        for _ in 0..200 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let digits = format!("{}{}", state, state.rotate_left(29) % 1_000_000);
            let exponent = (state % 40) as i64 - 20;
            generated.push(format!("{}.{}e{exponent}", &digits[..1], &digits[1..]));
        }
        for literal in floats.iter().map(|s| s.to_string()).chain(generated) {
            let body = format!(r#"{{"message": "m", "n": {literal}, "list": [{literal}]}}"#);
            let (job, decoded) = through_the_queue(&body);
            let expected: f64 = literal.parse().unwrap();
            assert_eq!(
                job.extra["n"].as_f64(),
                Some(expected),
                "{literal} in the sender"
            );
            assert_eq!(
                decoded.extra["n"].as_f64(),
                Some(expected),
                "{literal} in the worker"
            );
            assert_eq!(
                decoded.extra["list"][0].as_f64(),
                Some(expected),
                "{literal} in an array"
            );
        }
    }

    /// Numbers JSON allows but an f64/i64/u64 cannot hold exactly: what the
    /// worker gets is what the sender read (no change in transit), and what
    /// the sender read is documented in the README (send such values as
    /// strings to keep every digit).
    #[test]
    fn big_integers_and_negative_zero_through_the_queue() {
        // Within u64 / i64: exact, still integers.
        let (_, decoded) = through_the_queue(
            r#"{"message": "m", "max": 18446744073709551615, "min": -9223372036854775808}"#,
        );
        assert_eq!(decoded.extra["max"].as_u64(), Some(u64::MAX));
        assert_eq!(decoded.extra["min"].as_i64(), Some(i64::MIN));
        // Beyond them: read as the nearest f64 (digits beyond ~17 are lost at
        // the sender, then carried unchanged).
        let (_, decoded) = through_the_queue(
            r#"{"message": "m", "big": 18446744073709551616, "neg": -9223372036854775809, "huge": 123456789012345678901234567890}"#,
        );
        assert!(decoded.extra["big"].is_f64());
        assert_eq!(decoded.extra["big"].as_f64(), Some(18446744073709551616.0));
        assert_eq!(decoded.extra["neg"].as_f64(), Some(-9223372036854775809.0));
        assert_eq!(
            decoded.extra["huge"].to_string(),
            "1.2345678901234568e+29",
            "the worker sees the f64 the sender read"
        );
        // -0.0 keeps its sign; serde_json reads the integer -0 as the float -0.0.
        let (_, decoded) = through_the_queue(r#"{"message": "m", "z": -0.0, "i": -0}"#);
        let z = decoded.extra["z"].as_f64().unwrap();
        assert!(z == 0.0 && z.is_sign_negative(), "-0.0 became {z}");
        assert_eq!(decoded.extra["z"].to_string(), "-0.0");
        assert_eq!(decoded.extra["i"].to_string(), "-0.0");
        // Beyond f64's range JSON numbers are a client error, not infinity.
        assert_eq!(
            code(JSON, r#"{"message": "m", "n": 1e400}"#).unwrap_err(),
            "malformed_json"
        );
    }
}

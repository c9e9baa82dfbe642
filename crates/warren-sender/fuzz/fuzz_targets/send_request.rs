//! `POST /send` validation on arbitrary input: the first byte picks a
//! Content-Type (or, above the known ones, the bytes up to the first newline
//! are the header's value), the rest is the body. Whatever arrives, the
//! validator answers without panicking; what it accepts obeys the dot rule
//! and survives the trip through the envelope to the worker unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_broker::Envelope;
use warren_sender::validation::{DotRule, parse_job};

const CONTENT_TYPES: [Option<&str>; 5] = [
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("application/vnd.warren+json"),
    Some("text/plain"),
    None,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (content_type, body) = match CONTENT_TYPES.get(usize::from(selector)) {
        Some(known) => (known.map(str::to_string), rest),
        None => {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            (Some(value), rest.get(end + 1..).unwrap_or_default())
        }
    };
    for rule in [
        DotRule::default(),
        DotRule {
            enabled: false,
            ..DotRule::default()
        },
    ] {
        match parse_job(content_type.as_deref(), body, &rule) {
            Ok(job) => {
                assert!(!job.message.trim().is_empty());
                assert!(rule.allows(job.message.matches('.').count()));
                let envelope = Envelope::new(job.message.clone(), job.extra.clone());
                let decoded = Envelope::from_bytes(&envelope.to_bytes())
                    .expect("an accepted job decodes in the worker");
                assert_eq!(decoded, envelope, "the job changed on its way to the worker");
            }
            Err(rejection) => {
                assert!(matches!(rejection.status.as_u16(), 400 | 415), "{rejection:?}");
                assert!(!rejection.detail.is_empty());
            }
        }
    }
});

//! The worker's envelope decoding on arbitrary message bodies: any body is
//! either a job or an error (which dead-letters it), never a panic; a body
//! that decodes re-encodes to the same job.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_broker::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_bytes(data) {
        let again = Envelope::from_bytes(&envelope.to_bytes())
            .expect("a decoded envelope re-encodes to a decodable one");
        assert_eq!(again, envelope);
    }
});

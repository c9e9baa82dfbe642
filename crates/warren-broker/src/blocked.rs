//! RabbitMQ's resource alarms as seen by a client: `connection.blocked` and
//! `connection.unblocked`.
//!
//! When a memory or disk alarm fires, RabbitMQ blocks every connection that
//! publishes (it sends `connection.blocked` on the first publish after the
//! alarm and stops reading from that socket); lapin then stops writing to
//! it, acks included. The connection stays open, so without this signal a
//! blocked publisher only learns of it when each confirm times out.

use lapin::Event;

/// The blocked state an event moves the connection to, logging the change:
/// `Some(true)` on `connection.blocked`, `Some(false)` on
/// `connection.unblocked`, `None` for any other event.
pub fn blocked_transition(event: &Event, role: &'static str) -> Option<bool> {
    match event {
        Event::ConnectionBlocked(reason) => {
            tracing::warn!(role, reason = %reason, "RabbitMQ blocked the connection (resource alarm): it reads nothing from us until it unblocks");
            Some(true)
        }
        Event::ConnectionUnblocked => {
            tracing::info!(role, "RabbitMQ unblocked the connection");
            Some(false)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_block_and_unblock_change_the_state() {
        assert_eq!(
            blocked_transition(&Event::ConnectionBlocked("low on memory".into()), "test"),
            Some(true)
        );
        assert_eq!(
            blocked_transition(&Event::ConnectionUnblocked, "test"),
            Some(false)
        );
        assert_eq!(blocked_transition(&Event::Connected, "test"), None);
        assert_eq!(blocked_transition(&Event::SendFlow(false), "test"), None);
    }
}

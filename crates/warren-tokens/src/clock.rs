//! Time as an input: the gate and the store ask a [`Clock`], so tests can
//! cross a month boundary or an expiry without waiting.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike as _, NaiveDate, TimeZone as _, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock tests set by hand.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(at)))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        if let Ok(mut now) = self.0.lock() {
            *now = at;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
            .lock()
            .map(|now| *now)
            .unwrap_or_else(|e| *e.into_inner())
    }
}

/// The first day of the UTC calendar month containing `at`.
pub fn month_start(at: DateTime<Utc>) -> NaiveDate {
    NaiveDate::from_ymd_opt(at.year(), at.month(), 1).unwrap_or(NaiveDate::MIN)
}

/// The instant the UTC calendar month after `at`'s begins.
pub fn next_month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whole seconds from `at` until the next UTC month begins (at least 1).
pub fn seconds_until_next_month(at: DateTime<Utc>) -> u64 {
    let seconds = ((next_month_start(at) - at).num_milliseconds() + 999) / 1000;
    u64::try_from(seconds).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(
            month_start(at("2026-02-28T23:59:59Z")),
            NaiveDate::from_ymd_opt(2026, 2, 1).unwrap()
        );
        assert_eq!(
            next_month_start(at("2026-12-31T10:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        // February 2028 has 29 days: a month is not 30 days.
        assert_eq!(
            seconds_until_next_month(at("2028-02-01T00:00:00Z")),
            29 * 86_400
        );
        assert_eq!(seconds_until_next_month(at("2026-01-31T23:59:59.5Z")), 1);
    }
}

//! Step 2: stabilization windows (HPA semantics).
//!
//! Scale-up goes only as far as the *lowest* recommendation made within the
//! scale-up window (including this one); scale-down only as far as the
//! *highest* recommendation within the scale-down window. A count between the
//! two bounds is kept as it is. With empty windows the recommendation passes
//! through unchanged.

use chrono::{DateTime, Utc};
use warren_crd::QueueScalerSpec;

use crate::History;

/// The stabilized replica count for `recommendation` from `current`.
pub fn stabilize(
    spec: &QueueScalerSpec,
    recommendation: i32,
    current: i32,
    history: &History,
    now: DateTime<Utc>,
) -> i32 {
    let up_window = spec.behavior.scale_up.stabilization_window_seconds;
    let down_window = spec.behavior.scale_down.stabilization_window_seconds;
    let up_bound = history
        .recommendations_within(now, up_window)
        .fold(recommendation, i32::min);
    let down_bound = history
        .recommendations_within(now, down_window)
        .fold(recommendation, i32::max);
    // up_bound <= recommendation <= down_bound, so this cannot panic.
    current.clamp(up_bound, down_bound)
}

//! Busy-aware scale-in: which `controller.kubernetes.io/pod-deletion-cost`
//! each worker pod should carry before the ReplicaSet removes some of them.
//!
//! The ReplicaSet controller deletes pods with the lowest cost first. A pod
//! whose AMQP connection (named after the pod) holds unacked messages is in
//! the middle of a job: it gets a high cost, higher the more it holds. An
//! idle connected pod gets 0, and a pod with no connection at all (starting,
//! or not a worker) gets a negative cost so it goes first.

use std::collections::BTreeMap;

use crate::observe::management::ConnectionUnacked;

/// The annotation the ReplicaSet controller reads.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Cost of a pod whose connection holds no unacked message.
pub const IDLE_COST: i32 = 0;
/// Cost of a pod with no broker connection.
pub const DISCONNECTED_COST: i32 = -1000;
/// Cost of a busy pod: this plus its unacked count (capped at 1000).
pub const BUSY_COST_BASE: i32 = 1000;

/// What the reconciler knows about one pod of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Current value of the annotation, if any.
    pub current_cost: Option<String>,
    /// Already being deleted: leave it alone.
    pub terminating: bool,
}

/// The cost a pod should carry.
pub fn cost_for(pod: &str, unacked: &ConnectionUnacked) -> i32 {
    match unacked.by_connection.get(pod) {
        None => DISCONNECTED_COST,
        Some(0) => IDLE_COST,
        Some(n) => BUSY_COST_BASE + i32::try_from((*n).min(1000)).unwrap_or(1000),
    }
}

/// Pods whose annotation must change, sorted by name, with their new cost.
pub fn plan(pods: &[PodView], unacked: &ConnectionUnacked) -> BTreeMap<String, i32> {
    pods.iter()
        .filter(|pod| !pod.terminating)
        .filter_map(|pod| {
            let cost = cost_for(&pod.name, unacked);
            let unchanged = pod
                .current_cost
                .as_deref()
                .and_then(|c| c.trim().parse::<i32>().ok())
                == Some(cost);
            (!unchanged).then(|| (pod.name.clone(), cost))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cost: Option<&str>) -> PodView {
        PodView {
            name: name.into(),
            current_cost: cost.map(String::from),
            terminating: false,
        }
    }

    #[test]
    fn busy_pods_cost_more_than_idle_ones_and_disconnected_go_first() {
        let unacked = ConnectionUnacked {
            by_connection: [("busy".to_string(), 2), ("idle".to_string(), 0)].into(),
        };
        let busy = cost_for("busy", &unacked);
        let idle = cost_for("idle", &unacked);
        let gone = cost_for("starting", &unacked);
        assert!(busy > idle && idle > gone, "{busy} {idle} {gone}");
        assert_eq!(busy, 1002);
    }

    #[test]
    fn only_changed_pods_are_patched_and_terminating_ones_are_skipped() {
        let unacked = ConnectionUnacked {
            by_connection: [
                ("a".to_string(), 1),
                ("b".to_string(), 0),
                ("c".to_string(), 0),
            ]
            .into(),
        };
        let mut leaving = pod("d", None);
        leaving.terminating = true;
        let pods = [
            pod("a", Some("0")),
            pod("b", Some("0")),
            pod("c", None),
            leaving,
        ];
        let plan = plan(&pods, &unacked);
        assert_eq!(
            plan.into_iter().collect::<Vec<_>>(),
            vec![("a".to_string(), 1001), ("c".to_string(), 0)]
        );
    }
}

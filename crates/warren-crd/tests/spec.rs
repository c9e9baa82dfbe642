//! Defaults, validation rules, the generated schema and the example manifest.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use warren_crd::{
    ConditionStatus, PolicyType, QueueScaler, QueueScalerSpec, ScalingPolicy, SelectPolicy,
    SpecError, TargetKind,
};

fn minimal() -> Value {
    json!({
        "scaleTargetRef": {"name": "warren-worker"},
        "queue": {"name": "tasks"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 10
    })
}

fn spec_from(value: Value) -> QueueScalerSpec {
    serde_json::from_value(value).unwrap()
}

fn valid() -> QueueScalerSpec {
    spec_from(minimal())
}

#[test]
fn minimal_spec_gets_the_contract_defaults() {
    let spec = valid();
    assert_eq!(spec.scale_target_ref.api_version, "apps/v1");
    assert_eq!(spec.scale_target_ref.kind, TargetKind::Deployment);
    assert_eq!(spec.queue.vhost, "/");
    assert_eq!(spec.broker.management_url, "http://warren-rabbitmq:15672");
    assert_eq!(spec.broker.amqp_url, "amqp://warren-rabbitmq:5672");
    assert_eq!(spec.broker.credentials_secret_ref.username_key, "username");
    assert_eq!(spec.broker.credentials_secret_ref.password_key, "password");
    assert_eq!(spec.min_replicas, 0);
    assert_eq!(spec.max_replicas, 10);
    assert_eq!(spec.messages_per_replica, 5);
    assert_eq!(spec.activation_messages, 0);
    assert!(spec.count_unacked);
    assert_eq!(spec.target_drain_seconds, None);
    assert_eq!(spec.polling_interval_seconds, 5);
    assert_eq!(spec.behavior.scale_up.stabilization_window_seconds, 0);
    assert_eq!(spec.behavior.scale_down.stabilization_window_seconds, 300);
    assert_eq!(spec.behavior.scale_up.select_policy, SelectPolicy::Max);
    assert_eq!(spec.behavior.cooldown_seconds, 60);
    assert_eq!(
        spec.behavior.scale_up.policies,
        vec![
            ScalingPolicy {
                policy_type: PolicyType::Pods,
                value: 4,
                period_seconds: 15
            },
            ScalingPolicy {
                policy_type: PolicyType::Percent,
                value: 100,
                period_seconds: 15
            },
        ]
    );
    assert_eq!(
        spec.behavior.scale_down.policies,
        vec![ScalingPolicy {
            policy_type: PolicyType::Percent,
            value: 100,
            period_seconds: 15
        }]
    );
    assert_eq!(spec.fallback.failure_threshold, 3);
    assert_eq!(spec.fallback.replicas, None);
    assert!(!spec.paused);
    assert_eq!(spec.validate(), Ok(()));
}

#[test]
fn partial_scale_down_rules_keep_the_direction_defaults() {
    let mut value = minimal();
    value["behavior"] = json!({"scaleDown": {"selectPolicy": "Min"}});
    let spec = spec_from(value);
    assert_eq!(spec.behavior.scale_down.stabilization_window_seconds, 300);
    assert_eq!(spec.behavior.scale_down.select_policy, SelectPolicy::Min);
    assert_eq!(spec.behavior.scale_down.policies.len(), 1);
    assert_eq!(spec.behavior.scale_up.stabilization_window_seconds, 0);
    assert_eq!(spec.behavior.cooldown_seconds, 60);
}

#[test]
fn empty_policy_list_resolves_to_the_default_policies() {
    let mut value = minimal();
    value["behavior"] = json!({"scaleUp": {"policies": []}, "scaleDown": {"policies": []}});
    let spec = spec_from(value);
    assert_eq!(spec.behavior.scale_up.resolved().policies.len(), 2);
    assert_eq!(spec.behavior.scale_down.resolved().policies.len(), 1);
}

#[test]
fn unknown_enum_values_are_rejected() {
    let mut value = minimal();
    value["scaleTargetRef"]["kind"] = json!("ReplicaSet");
    assert!(serde_json::from_value::<QueueScalerSpec>(value).is_err());
    let mut value = minimal();
    value["behavior"] = json!({"scaleUp": {"selectPolicy": "Most"}});
    assert!(serde_json::from_value::<QueueScalerSpec>(value).is_err());
}

#[test]
fn spec_round_trips_through_json() {
    let spec = valid();
    let back: QueueScalerSpec =
        serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn history_retention_is_the_longest_window_or_period() {
    let spec = valid();
    assert_eq!(spec.history_retention().as_secs(), 300);
    let mut value = minimal();
    value["behavior"] = json!({
        "scaleDown": {"stabilizationWindowSeconds": 10},
        "scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]}
    });
    assert_eq!(spec_from(value).history_retention().as_secs(), 600);
}

/// A change that breaks one rule of a valid spec.
type Mutation = fn(&mut QueueScalerSpec);

#[test]
fn validate_rejects_each_broken_rule() {
    use SpecError::*;
    let cases: Vec<(&str, Mutation, SpecError)> = vec![
        (
            "negative min",
            |s| s.min_replicas = -1,
            NegativeMinReplicas(-1),
        ),
        ("max zero", |s| s.max_replicas = 0, MaxReplicasBelowOne(0)),
        (
            "max below min",
            |s| s.min_replicas = 11,
            MaxBelowMin { min: 11, max: 10 },
        ),
        (
            "messagesPerReplica 0",
            |s| s.messages_per_replica = 0,
            Zero {
                field: "messagesPerReplica",
            },
        ),
        (
            "drain 0",
            |s| s.target_drain_seconds = Some(0),
            Zero {
                field: "targetDrainSeconds",
            },
        ),
        (
            "polling 0",
            |s| s.polling_interval_seconds = 0,
            Zero {
                field: "pollingIntervalSeconds",
            },
        ),
        (
            "failureThreshold 0",
            |s| s.fallback.failure_threshold = 0,
            Zero {
                field: "fallback.failureThreshold",
            },
        ),
        (
            "fallback above max",
            |s| s.fallback.replicas = Some(11),
            FallbackOutOfRange {
                replicas: 11,
                max: 10,
            },
        ),
        (
            "fallback zero",
            |s| s.fallback.replicas = Some(0),
            FallbackOutOfRange {
                replicas: 0,
                max: 10,
            },
        ),
        (
            "empty target",
            |s| s.scale_target_ref.name = " ".into(),
            Empty {
                field: "scaleTargetRef.name",
            },
        ),
        ("no queue", |s| s.queue.name = String::new(), NoQueue),
        (
            "blank queue",
            |s| s.queue.name = " ".into(),
            Empty {
                field: "queue.name",
            },
        ),
        (
            "blank queue in names",
            |s| s.queue.names = vec!["sms".into(), String::new()],
            Empty {
                field: "queue.names[]",
            },
        ),
        (
            "bad pattern",
            |s| s.queue.pattern = Some("sms([".into()),
            BadPattern {
                pattern: "sms([".into(),
                // Built at run time: clippy rejects an invalid regex literal.
                reason: regex::Regex::new(&String::from("sms(["))
                    .unwrap_err()
                    .to_string(),
            },
        ),
        (
            "drain with max",
            |s| {
                s.target_drain_seconds = Some(60);
                s.queue.operation = warren_crd::Operation::Max;
            },
            DrainNeedsSum(warren_crd::Operation::Max),
        ),
        (
            "empty vhost",
            |s| s.queue.vhost = String::new(),
            Empty {
                field: "queue.vhost",
            },
        ),
        (
            "empty secret",
            |s| s.broker.credentials_secret_ref.name = String::new(),
            Empty {
                field: "broker.credentialsSecretRef.name",
            },
        ),
        (
            "api version",
            |s| s.scale_target_ref.api_version = "apps/v1beta1".into(),
            UnsupportedApiVersion("apps/v1beta1".into()),
        ),
        (
            "up window too long",
            |s| s.behavior.scale_up.stabilization_window_seconds = 3601,
            TooLarge {
                field: "behavior.scaleUp.stabilizationWindowSeconds",
                value: 3601,
                limit: 3600,
            },
        ),
        (
            "down window too long",
            |s| s.behavior.scale_down.stabilization_window_seconds = 4000,
            TooLarge {
                field: "behavior.scaleDown.stabilizationWindowSeconds",
                value: 4000,
                limit: 3600,
            },
        ),
        (
            "policy value 0",
            |s| s.behavior.scale_up.policies[0].value = 0,
            Zero {
                field: "behavior.scaleUp.policies",
            },
        ),
        (
            "policy period 0",
            |s| s.behavior.scale_down.policies[0].period_seconds = 0,
            Zero {
                field: "behavior.scaleDown.policies",
            },
        ),
        (
            "policy period too long",
            |s| s.behavior.scale_down.policies[0].period_seconds = 1801,
            TooLarge {
                field: "behavior.scaleDown.policies",
                value: 1801,
                limit: 1800,
            },
        ),
        (
            "management scheme",
            |s| s.broker.management_url = "amqp://x:15672".into(),
            WrongScheme {
                field: "broker.managementUrl",
                expected: "http or https",
                got: "amqp".into(),
            },
        ),
        (
            "amqp scheme",
            |s| s.broker.amqp_url = "http://x:5672".into(),
            WrongScheme {
                field: "broker.amqpUrl",
                expected: "amqp or amqps",
                got: "http".into(),
            },
        ),
        (
            "inline password",
            |s| s.broker.amqp_url = "amqp://guest:guest@x:5672".into(),
            CredentialsInUrl {
                field: "broker.amqpUrl",
            },
        ),
        (
            "inline user",
            |s| s.broker.management_url = "http://admin@x:15672".into(),
            CredentialsInUrl {
                field: "broker.managementUrl",
            },
        ),
    ];
    for (name, mutate, expected) in cases {
        let mut spec = valid();
        mutate(&mut spec);
        assert_eq!(spec.validate(), Err(expected), "case {name}");
    }
}

#[test]
fn validate_rejects_an_unparseable_url() {
    let mut spec = valid();
    spec.broker.management_url = "not a url".into();
    assert!(matches!(
        spec.validate(),
        Err(SpecError::BadUrl {
            field: "broker.managementUrl",
            ..
        })
    ));
}

#[test]
fn validate_accepts_edge_values() {
    let mut spec = valid();
    spec.min_replicas = 10;
    spec.max_replicas = 10;
    spec.fallback.replicas = Some(10);
    spec.messages_per_replica = 1;
    spec.target_drain_seconds = Some(1);
    spec.polling_interval_seconds = 1;
    spec.behavior.scale_up.stabilization_window_seconds = 3600;
    spec.behavior.scale_down.policies = vec![];
    spec.broker.management_url = "https://rabbit.example:15671/".into();
    spec.broker.amqp_url = "amqps://rabbit.example:5671".into();
    assert_eq!(spec.validate(), Ok(()));
}

#[test]
fn spec_error_messages_name_the_field() {
    let err = SpecError::MaxBelowMin { min: 3, max: 2 };
    assert_eq!(
        err.to_string(),
        "maxReplicas (2) must be >= minReplicas (3)"
    );
}

fn crd_schema() -> Value {
    let crd = serde_json::to_value(QueueScaler::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn crd_has_names_scope_subresource_and_printer_columns() {
    let crd = serde_json::to_value(QueueScaler::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "queuescalers.warren.dev");
    assert_eq!(crd["spec"]["group"], "warren.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "QueueScaler");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["qs"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<(String, String, String)> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
                c["jsonPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("Target", "string", ".spec.scaleTargetRef.name"),
        ("Queue", "string", ".status.queueSummary"),
        ("Messages", "integer", ".status.observation.ready"),
        ("Replicas", "integer", ".status.currentReplicas"),
        ("Desired", "integer", ".status.desiredReplicas"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(columns, expected);
}

#[test]
fn schema_shows_defaults_bounds_enums_and_cel_rule() {
    let schema = crd_schema();
    let spec = &schema["properties"]["spec"];
    let props = &spec["properties"];
    assert_eq!(
        spec["required"],
        json!(["broker", "maxReplicas", "queue", "scaleTargetRef"])
    );
    assert_eq!(props["minReplicas"]["default"], 0);
    assert_eq!(props["minReplicas"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(props["maxReplicas"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["messagesPerReplica"]["default"], 5);
    assert_eq!(props["messagesPerReplica"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["pollingIntervalSeconds"]["default"], 5);
    assert_eq!(
        props["pollingIntervalSeconds"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(props["targetDrainSeconds"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["countUnacked"]["default"], true);
    assert_eq!(props["paused"]["default"], false);
    assert_eq!(props["queue"]["properties"]["vhost"]["default"], "/");
    assert_eq!(
        props["scaleTargetRef"]["properties"]["kind"]["enum"],
        json!(["Deployment", "StatefulSet"])
    );
    let behavior = &props["behavior"]["properties"];
    assert_eq!(behavior["cooldownSeconds"]["default"], 60);
    assert_eq!(
        behavior["scaleDown"]["properties"]["stabilizationWindowSeconds"]["default"],
        300
    );
    assert_eq!(
        behavior["scaleUp"]["properties"]["selectPolicy"]["enum"],
        json!(["Max", "Min", "Disabled"])
    );
    let policy = &behavior["scaleUp"]["properties"]["policies"]["items"]["properties"];
    assert_eq!(policy["type"]["enum"], json!(["Pods", "Percent"]));
    assert_eq!(policy["value"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(policy["periodSeconds"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(
        props["fallback"]["properties"]["failureThreshold"]["default"],
        3
    );
    let rules = spec["x-kubernetes-validations"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["rule"] == "self.maxReplicas >= self.minReplicas")
    );
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["items"]["properties"]["status"]["enum"],
        json!(["True", "False", "Unknown"])
    );
}

#[test]
fn schema_has_no_unsigned_integer_formats() {
    let text = serde_json::to_string(&crd_schema()).unwrap();
    assert!(!text.contains("\"format\":\"uint"), "{text}");
    assert!(text.contains("\"format\":\"int32\""));
}

fn example() -> QueueScaler {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../manifests/queuescaler.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

#[test]
fn example_manifest_deserializes_and_validates() {
    let qs = example();
    assert_eq!(qs.metadata.name.as_deref(), Some("warren-worker"));
    let spec = &qs.spec;
    assert_eq!(spec.scale_target_ref.kind, TargetKind::Deployment);
    assert_eq!(spec.scale_target_ref.name, "warren-worker");
    assert_eq!(spec.queue.name, "tasks");
    assert_eq!(spec.queue.vhost, "/");
    assert_eq!(spec.broker.credentials_secret_ref.name, "warren-rabbitmq");
    assert_eq!(spec.min_replicas, 0);
    assert_eq!(spec.max_replicas, 10);
    assert_eq!(spec.messages_per_replica, 5);
    assert_eq!(spec.polling_interval_seconds, 2);
    assert!(spec.fallback.replicas.is_some());
    assert_eq!(spec.validate(), Ok(()));
}

#[test]
fn target_key_uses_the_scaler_namespace() {
    let mut qs = example();
    qs.metadata.namespace = Some("jobs".into());
    let key = qs.target_key().unwrap();
    assert_eq!(key.namespace, "jobs");
    assert_eq!(key.kind, TargetKind::Deployment);
    assert_eq!(key.name, "warren-worker");
    assert_eq!(key.to_string(), "Deployment/jobs/warren-worker");
    qs.metadata.namespace = None;
    assert_eq!(qs.target_key(), None);
}

#[test]
fn set_condition_keeps_transition_time_while_status_holds() {
    use chrono::{TimeZone, Utc};
    use warren_crd::{Condition, QueueScalerStatus, condition_type::READY};
    let t0 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let t1 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 1, 0).unwrap();
    let t2 = Utc.with_ymd_and_hms(2025, 1, 1, 0, 2, 0).unwrap();
    let mut status = QueueScalerStatus::default();
    status.set_condition(Condition::new(
        READY,
        ConditionStatus::True,
        "Scaling",
        "ok",
        t0,
    ));
    status.set_condition(Condition::new(
        READY,
        ConditionStatus::True,
        "Scaling",
        "still ok",
        t1,
    ));
    let ready = status.condition(READY).unwrap();
    assert_eq!(ready.last_transition_time, t0);
    assert_eq!(ready.message, "still ok");
    status.set_condition(Condition::new(
        READY,
        ConditionStatus::False,
        "InvalidSpec",
        "bad",
        t2,
    ));
    assert_eq!(status.condition(READY).unwrap().last_transition_time, t2);
    assert_eq!(status.conditions.len(), 1);
}

#[test]
fn observation_derives_per_replica_ack_rate() {
    use chrono::Utc;
    use warren_crd::Observation;
    let now = Utc::now();
    let obs = Observation::new(10, 2, 4, Some(3.0), Some(8.0), now);
    assert_eq!(obs.per_replica_ack_rate, Some(2.0));
    assert!(!obs.is_empty());
    assert_eq!(
        Observation::new(0, 0, 0, None, Some(8.0), now).per_replica_ack_rate,
        None
    );
    assert_eq!(
        Observation::new(0, 0, 3, None, Some(0.0), now).per_replica_ack_rate,
        None
    );
    assert!(Observation::new(0, 0, 3, None, None, now).is_empty());
    assert!(!Observation::new(0, 1, 3, None, None, now).is_empty());
}

#[test]
fn several_queues_by_names_and_pattern() {
    let spec = spec_from(json!({
        "scaleTargetRef": {"name": "warren-worker-notify"},
        "queue": {"names": ["sms", "email", "sms"], "pattern": "^push-", "operation": "avg"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 10
    }));
    assert_eq!(spec.validate(), Ok(()));
    let queue = &spec.queue;
    assert!(queue.is_multi());
    assert_eq!(queue.name, "");
    assert_eq!(queue.vhost, "/");
    assert_eq!(queue.operation, warren_crd::Operation::Avg);
    assert_eq!(queue.named(), vec!["sms", "email"]);
    // Named queues first (listed or not), then the listed matches, sorted, once.
    let listed = ["push-b", "email", "other", "push-a", "sms.dead", "mypush-x"];
    assert_eq!(
        queue.resolve(listed),
        vec!["sms", "email", "push-a", "push-b"]
    );
    assert_eq!(queue.summary(), "sms,email,/^push-/ (avg)");
    // Unanchored, like RabbitMQ's use_regex filter.
    let mut loose = queue.clone();
    loose.pattern = Some("push".into());
    assert_eq!(
        loose.resolve(listed),
        vec!["sms", "email", "mypush-x", "push-a", "push-b"]
    );
    // The single form is unchanged, and serializes as before.
    let single = valid();
    assert!(!single.queue.is_multi());
    assert_eq!(single.queue.summary(), "tasks");
    assert_eq!(single.queue.resolve(listed), vec!["tasks"]);
    assert_eq!(
        serde_json::to_value(&single.queue).unwrap(),
        json!({"name": "tasks", "vhost": "/"})
    );
}

#[test]
fn operations_combine_counts_as_documented() {
    use warren_crd::Operation::{Avg, Max, Sum};
    assert_eq!(Sum.combine(&[12, 3, 0]), 15);
    assert_eq!(Max.combine(&[12, 3, 0]), 12);
    assert_eq!(Avg.combine(&[12, 3, 0]), 5);
    assert_eq!(Avg.combine(&[1, 0, 0]), 1, "avg rounds up");
    for op in [Sum, Max, Avg] {
        assert_eq!(op.combine(&[]), 0);
        assert_eq!(op.combine(&[7]), 7);
    }
    assert_eq!(Sum.combine(&[u64::MAX, 1]), u64::MAX);
}

#[test]
fn schema_shows_the_queue_selector_rules() {
    let schema = crd_schema();
    let spec = &schema["properties"]["spec"];
    let queue = &spec["properties"]["queue"];
    assert_eq!(
        queue["properties"]["operation"]["enum"],
        json!(["sum", "max", "avg"])
    );
    assert_eq!(queue["properties"]["names"]["maxItems"], 64);
    assert_eq!(queue["properties"]["names"]["items"]["minLength"], 1);
    assert_eq!(queue["properties"]["pattern"]["maxLength"], 256);
    assert_eq!(queue["required"], Value::Null, "name is no longer required");
    let rules = queue["x-kubernetes-validations"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert!(
        rules[0]["rule"]
            .as_str()
            .unwrap()
            .contains("has(self.pattern)")
    );
    let spec_rules = spec["x-kubernetes-validations"].as_array().unwrap();
    assert!(
        spec_rules
            .iter()
            .any(|r| r["message"] == "targetDrainSeconds needs queue.operation sum")
    );
}

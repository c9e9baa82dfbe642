//! The sender against a real RabbitMQ: validation, confirmed publishing,
//! broker outage and recovery.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::client;
use futures::future::join_all;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use warren_sender::RunningSender;
use warren_testkit::{
    EventTap, RabbitNode, RabbitOptions, ready_count, shared_amqp_url, unique_name,
};

async fn start_sender(amqp_url: &str, queue: &str, extra: &[&str]) -> RunningSender {
    let mut flags = vec!["--confirm-timeout-ms", "2000"];
    flags.extend_from_slice(extra);
    common::start_sender(amqp_url, queue, &flags).await
}

async fn post(
    sender: &RunningSender,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Option<String>, Option<String>, Value) {
    let mut request = client()
        .post(format!("http://{}{path}", sender.addr))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, content_type, retry_after, body)
}

fn job(message: &str) -> String {
    json!({ "message": message }).to_string()
}

#[tokio::test]
async fn bad_inputs_get_the_right_status_and_a_json_error_and_nothing_is_published() {
    let url = shared_amqp_url();
    let queue = unique_name("sender-bad");
    let sender = start_sender(&url, &queue, &["--max-body-bytes", "1024"]).await;
    let json = Some("application/json");
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "/send",
            json,
            job("Hello RabbitMQ!.........."),
            400,
            "dot_rule",
        ),
        ("/send", json, job("   "), 400, "blank_message"),
        ("/send", json, String::new(), 400, "missing_message"),
        ("/send", json, "{}".into(), 400, "missing_message"),
        (
            "/send",
            json,
            r#"{"message": 17}"#.into(),
            400,
            "message_not_string",
        ),
        (
            "/send",
            json,
            r#"{"message": "a"#.into(),
            400,
            "malformed_json",
        ),
        (
            "/send",
            Some("text/plain"),
            job("hi"),
            415,
            "unsupported_media_type",
        ),
        ("/send", None, job("hi"), 415, "unsupported_media_type"),
        ("/send", json, job(&"x".repeat(2000)), 413, "body_too_large"),
        ("/send/nope", json, job("hi"), 404, "unknown_queue"),
    ];
    for (path, content_type, body, status, code) in cases {
        let (got, got_type, _, got_body) = post(&sender, path, content_type, body.clone()).await;
        assert_eq!(got, status, "{path} {body:?}: {got_body}");
        assert_eq!(
            got_type.as_deref(),
            Some("application/problem+json"),
            "{body:?}"
        );
        assert_eq!(got_body["code"], code, "{body:?}: {got_body}");
        assert_eq!(got_body["status"], status);
        assert!(got_body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(
        ready_count(&url, &queue).await.unwrap(),
        0,
        "a rejected request was published"
    );
    // The same sender does accept a good job (so the zero above means something).
    let (status, _, _, _) = post(&sender, "/send", json, job("Hello RabbitMQ!.....")).await;
    assert_eq!(status, 202);
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 1);
}

#[tokio::test]
async fn accepted_jobs_are_persistent_enveloped_and_announced() {
    let url = shared_amqp_url();
    let queue = unique_name("sender-ok");
    let sms = unique_name("sender-sms");
    let sender = start_sender(&url, &queue, &["--queues", &sms]).await;
    let tap = EventTap::bind(&url, "message.accepted").await.unwrap();

    let (status, _, _, body) = post(
        &sender,
        "/send",
        Some("application/json"),
        json!({"message": "Hello...", "phone": "600100200"}).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let (status, _, _, sms_body) = post(
        &sender,
        &format!("/send/{sms}"),
        Some("application/json"),
        job("sms"),
    )
    .await;
    assert_eq!(status, 202, "{sms_body}");

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the accepted job is in the queue");
    let envelope: Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(envelope["id"], id);
    assert_eq!(envelope["v"], 1);
    assert_eq!(envelope["message"], "Hello...");
    assert_eq!(envelope["phone"], "600100200");
    assert!(envelope["created_at"].as_str().is_some());
    let properties = &message.delivery.properties;
    assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        properties.message_id().as_ref().map(|m| m.to_string()),
        Some(id.clone())
    );
    message
        .delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(ready_count(&url, &sms).await.unwrap(), 1);

    // Ready while connected; the metrics count what happened.
    let ops = client();
    let ready = ops
        .get(format!("http://{}/readyz", sender.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = ops
        .get(format!("http://{}/metrics", sender.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"warren_sender_responses_total{status="202",code="accepted"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("warren_sender_broker_connected 1"),
        "{metrics}"
    );
    // Every refusal reason is exported from the start (0 with auth off), so
    // dashboards and alerts over it have a series to compute with.
    for reason in warren_sender::metrics::TOKEN_REFUSAL_REASONS {
        let series = format!("warren_sender_token_refusals_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }

    assert!(
        tap.wait_until(Duration::from_secs(10), |events| events
            .iter()
            .any(|e| e["id"] == id.as_str()))
            .await,
        "no message.accepted event for {id}: {:?}",
        tap.all()
    );
}

#[tokio::test]
async fn concurrent_requests_are_all_confirmed() {
    let url = shared_amqp_url();
    let queue = unique_name("sender-concurrent");
    let sender = start_sender(&url, &queue, &[]).await;
    let requests = (0..300).map(|i| {
        post(
            &sender,
            "/send",
            Some("application/json"),
            job(&format!("job {i}.")),
        )
    });
    let results = join_all(requests).await;
    let accepted = results.iter().filter(|r| r.0 == 202).count();
    assert_eq!(accepted, 300, "{:?}", results.iter().find(|r| r.0 != 202));
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 300);
}

/// `POST /send` skips axum's router (the hot path); what else reaches `/send`
/// still goes through it, and the 202 still carries its length.
#[tokio::test]
async fn send_answers_alike_with_and_without_the_router() {
    let url = shared_amqp_url();
    let queue = unique_name("sender-routes");
    let sender = start_sender(&url, &queue, &[]).await;
    let base = format!("http://{}", sender.addr);
    let response = client()
        .post(format!("{base}/send?trace=1"))
        .header("content-type", "application/json")
        .body(job("routed."))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let length = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.bytes().await.unwrap();
    assert_eq!(length, body.len().to_string());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["queue"], queue.as_str());
    // Other methods: 405 with the allowed one, from the router.
    let response = client().get(format!("{base}/send")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("POST"), "{allow}");
    // Near misses are not /send.
    for path in ["/send/", "/Send", "/sendx"] {
        let (status, _, _, _) = post(&sender, path, Some("application/json"), job("x")).await;
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 1);
}

#[tokio::test]
async fn broker_outage_gives_fast_503_with_retry_after_then_recovers_by_itself() {
    let mut node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let url = node.amqp_url();
    let queue = unique_name("sender-outage");
    // Classic: on this machine's RabbitMQ 3.10 a single-node quorum queue
    // stops confirming after the node is SIGKILLed and restarted (see
    // warren-broker/tests/publisher_restart.rs and the README).
    let sender = start_sender(&url, &queue, &["--queue-type", "classic"]).await;
    let json = Some("application/json");

    let mut accepted = 0u32;
    let (status, _, _, _) = post(&sender, "/send", json, job("before")).await;
    assert_eq!(status, 202);
    accepted += 1;

    node.kill().await.unwrap();
    // Not ready while the broker is gone (a load balancer stops sending).
    let readyz = format!("http://{}/readyz", sender.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client().get(&readyz).send().await.unwrap().status() != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 200 during the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every request during the outage ends quickly with 503 + Retry-After.
    for _ in 0..3 {
        let started = Instant::now();
        let (status, content_type, retry_after, body) =
            post(&sender, "/send", json, job("during")).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(retry_after.as_deref(), Some("2"));
        assert_eq!(body["code"], "broker_unavailable");
        assert!(
            took < Duration::from_secs(10),
            "a request hung for {took:?} during the outage"
        );
    }

    node.start_again().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, _, body) = post(&sender, "/send", json, job("after")).await;
        if status == 202 {
            accepted += 1;
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "the sender never recovered after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        sender.publisher.connect_count() >= 2,
        "the publisher did not reconnect"
    );
    // The job accepted before the crash survived it (durable queue, persistent message).
    assert_eq!(ready_count(&url, &queue).await.unwrap(), accepted);
}

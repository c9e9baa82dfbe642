//! `WARREN_AUTH=required`: the sender against a private PostgreSQL (tokens)
//! and the shared RabbitMQ. Two sender processes race one token; the
//! database goes away and comes back.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client;
use serde_json::{Value, json};
use warren_sender::RunningSender;
use warren_testkit::{PgNode, free_port, ready_count, shared_amqp_url, unique_name};
use warren_tokens::{Limit, NewToken, Store, SubjectKind, SubjectRef, SystemClock};

async fn database() -> (PgNode, Store) {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL (Debian's postgresql package) must start");
    let store = Store::new(
        warren_tokens::pool(&pg.url(), 2).unwrap(),
        Arc::new(SystemClock),
    );
    store.migrate().await.unwrap();
    (pg, store)
}

async fn token(
    store: &Store,
    user: &str,
    limit: Limit,
    queues: Option<Vec<String>>,
) -> (uuid::Uuid, String) {
    let _ = store.create_user(user, None).await;
    let (view, secret) = store
        .create_token(&NewToken {
            subject: SubjectRef {
                kind: SubjectKind::User,
                name: user.into(),
            },
            limit,
            queues,
            expires_at: None,
        })
        .await
        .unwrap();
    (view.id, secret.as_str().to_string())
}

async fn start_sender(database_url: &str, queue: &str, extra: &[&str]) -> RunningSender {
    let mut flags = vec!["--auth", "required", "--database-url", database_url];
    flags.extend_from_slice(extra);
    common::start_sender(&shared_amqp_url(), queue, &flags).await
}

struct Reply {
    status: u16,
    body: Value,
    www_authenticate: Option<String>,
    retry_after: Option<String>,
    content_type: Option<String>,
}

async fn send(
    client: &reqwest::Client,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Reply {
    let mut request = client
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (www_authenticate, retry_after, content_type) = (
        header("www-authenticate"),
        header("retry-after"),
        header("content-type"),
    );
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        www_authenticate,
        retry_after,
        content_type,
    }
}

fn job() -> String {
    json!({"message": "Hello RabbitMQ!"}).to_string()
}

/// `warren_sender_token_refusals_total` by reason, from the sender's /metrics.
async fn token_refusals(
    client: &reqwest::Client,
    addr: &str,
) -> std::collections::HashMap<String, f64> {
    let metrics = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("warren_sender_token_refusals_total{reason=\""))
        .filter_map(|l| {
            let (reason, value) = l.split_once("\"} ")?;
            Some((reason.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Waits until the sender at `addr` can check tokens (a well-formed unknown token gets 401, not 503).
async fn wait_gate(client: &reqwest::Client, addr: &str) {
    let unknown = warren_tokens::secret::Secret::generate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = match client
            .post(format!("http://{addr}/send"))
            .bearer_auth(unknown.as_str())
            .header("content-type", "application/json")
            .body(job())
            .send()
            .await
        {
            Ok(r) => r.status().as_u16() == 401,
            Err(_) => false,
        };
        // Checking tokens is not enough: a job sent before the broker connection is up
        // gets 503 broker_unavailable, so wait for /readyz too.
        let ready = ok
            && client
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200);
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sender at {addr} never checked tokens and became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn refusals_have_their_codes_and_headers_and_only_accepted_jobs_spend() {
    let (pg, store) = database().await;
    let queue = unique_name("auth");
    let sms = unique_name("auth-sms");
    let sender = start_sender(&pg.url(), &queue, &["--queues", &sms]).await;
    let addr = sender.addr.to_string();
    let client = client();
    wait_gate(&client, &addr).await;
    let counted_before = token_refusals(&client, &addr).await;

    let r = send(&client, &addr, "/send", None, job()).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("missing_token"))
    );
    assert_eq!(r.content_type.as_deref(), Some("application/problem+json"));
    assert!(r.www_authenticate.unwrap().starts_with("Bearer"));
    let r = send(&client, &addr, "/send", Some("wrn_nonsense"), job()).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("invalid_token"))
    );
    assert!(r.www_authenticate.unwrap().contains("invalid_token"));

    let (id, secret) = token(&store, "ana", Limit::MaxUses(2), Some(vec![queue.clone()])).await;
    // A body that fails validation spends nothing.
    let r = send(
        &client,
        &addr,
        "/send",
        Some(&secret),
        json!({"message": " "}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(
        &client,
        &addr,
        &format!("/send/{sms}"),
        Some(&secret),
        job(),
    )
    .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("queue_not_allowed"))
    );
    for _ in 0..2 {
        let r = send(&client, &addr, "/send", Some(&secret), job()).await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let r = send(&client, &addr, "/send", Some(&secret), job()).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (429, Some("usage_exceeded"))
    );
    assert_eq!(ready_count(&shared_amqp_url(), &queue).await.unwrap(), 2);

    let (_, monthly) = token(&store, "bob", Limit::Monthly(0), None).await;
    let r = send(&client, &addr, "/send", Some(&monthly), job()).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (429, Some("monthly_limit_reached"))
    );
    let retry: u64 = r.retry_after.expect("Retry-After").parse().unwrap();
    let expected = warren_tokens::clock::seconds_until_next_month(chrono::Utc::now());
    assert!(
        retry.abs_diff(expected) <= 5,
        "Retry-After {retry} vs {expected}"
    );

    // Each refusal is counted by its reason (warren_sender_token_refusals_total),
    // beyond what waiting for the gate cost (an unknown token, maybe several
    // times). Counted before the revocation: until its notification arrives the
    // spent token may earn more usage_exceeded.
    let counts = token_refusals(&client, &addr).await;
    let count = |reason: &str| -> f64 {
        let now = counts.get(reason).copied();
        let before = counted_before.get(reason).copied().unwrap_or(0.0);
        now.unwrap_or_else(|| panic!("no refusal count for {reason}: {counts:?}")) - before
    };
    for reason in [
        "missing_token",
        "invalid_token",
        "queue_not_allowed",
        "usage_exceeded",
        "monthly_limit_reached",
    ] {
        assert_eq!(count(reason), 1.0, "{reason}");
    }
    assert_eq!(count("token_expired"), 0.0);
    store.revoke(id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = send(&client, &addr, "/send", Some(&secret), job()).await;
        if r.body["code"] == "token_revoked" {
            assert_eq!(r.status, 401);
            break;
        }
        assert!(Instant::now() < deadline, "revocation not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let used = store.token(id).await.unwrap();
    assert_eq!(used.used + used.leased, 2, "{used:?}");

    let revoked = token_refusals(&client, &addr).await;
    assert!(
        revoked.get("token_revoked").is_some_and(|n| *n >= 1.0),
        "{revoked:?}"
    );
    sender.shutdown.cancel();
}

struct SenderProcess {
    child: Child,
    addr: String,
}

impl Drop for SenderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_sender(database_url: &str, queue: &str) -> SenderProcess {
    let port = free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_warren-sender"))
        .env("AMQP_URL", shared_amqp_url())
        .env("WARREN_QUEUE", queue)
        .env("WARREN_LISTEN_ADDR", &addr)
        .env("WARREN_AUTH", "required")
        .env("WARREN_DATABASE_URL", database_url)
        .env("WARREN_AUDIT_EVENTS", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the warren-sender binary runs");
    SenderProcess { child, addr }
}

#[tokio::test]
async fn two_sender_processes_racing_one_token_accept_exactly_the_limit() {
    const LIMIT: usize = 300;
    let (pg, store) = database().await;
    let queue = unique_name("auth-race");
    let senders = [
        spawn_sender(&pg.url(), &queue),
        spawn_sender(&pg.url(), &queue),
    ];
    let client = client();
    for sender in &senders {
        wait_gate(&client, &sender.addr).await;
    }
    let (id, secret) = token(&store, "race", Limit::MaxUses(LIMIT as u64), None).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (client, addr, secret) = (client.clone(), senders[i % 2].addr.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let (mut accepted, mut refused) = (0, 0);
            while refused < 10 {
                let r = send(&client, &addr, "/send", Some(&secret), job()).await;
                match r.status {
                    202 => accepted += 1,
                    429 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("unexpected {other}: {}", r.body),
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    assert_eq!(accepted, LIMIT, "accepted across two senders");
    assert_eq!(
        ready_count(&shared_amqp_url(), &queue).await.unwrap() as usize,
        LIMIT
    );

    // Both processes honour a revocation within a second.
    let (other, secret2) = token(&store, "other", Limit::Unlimited, None).await;
    for sender in &senders {
        assert_eq!(
            send(&client, &sender.addr, "/send", Some(&secret2), job())
                .await
                .status,
            202
        );
    }
    store.revoke(other).await.unwrap();
    let revoked = Instant::now();
    for sender in &senders {
        loop {
            let r = send(&client, &sender.addr, "/send", Some(&secret2), job()).await;
            if r.status == 401 {
                assert_eq!(r.body["code"], "token_revoked");
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "{} still accepts",
                sender.addr
            );
        }
    }
    let view = store.token(id).await.unwrap();
    assert!(view.used + view.leased <= LIMIT as u64);
}

#[tokio::test]
async fn database_down_is_503_auth_unavailable_never_an_accept_and_it_recovers() {
    let (mut pg, store) = database().await;
    let queue = unique_name("auth-down");
    let sender = start_sender(&pg.url(), &queue, &[]).await;
    let addr = sender.addr.to_string();
    let client = client();
    wait_gate(&client, &addr).await;
    let (_, secret) = token(&store, "ana", Limit::MaxUses(1_000_000), None).await;
    assert_eq!(
        send(&client, &addr, "/send", Some(&secret), job())
            .await
            .status,
        202
    );
    pg.kill().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(&client, &addr, "/send", Some(&secret), job()).await;
        if r.status == 503 {
            assert_eq!(r.body["code"], "auth_unavailable");
            assert!(r.retry_after.is_some());
            break;
        }
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "still accepting 5 s after the database died"
        );
    }
    let accepted_before = ready_count(&shared_amqp_url(), &queue).await.unwrap();
    for _ in 0..20 {
        let r = send(&client, &addr, "/send", Some(&secret), job()).await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (503, Some("auth_unavailable"))
        );
    }
    assert_eq!(
        ready_count(&shared_amqp_url(), &queue).await.unwrap(),
        accepted_before
    );
    // Not ready while tokens cannot be checked: Kubernetes stops routing here.
    wait_readyz(&client, &addr, 503).await;
    pg.start_again().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(&client, &addr, "/send", Some(&secret), job()).await;
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_readyz(&client, &addr, 200).await;
    sender.shutdown.cancel();
}

/// Waits until the sender's /readyz answers `status` (within 10 s).
async fn wait_readyz(client: &reqwest::Client, addr: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = client.get(format!("http://{addr}/readyz")).send().await;
        if answer.is_ok_and(|r| r.status().as_u16() == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sender started before `warren-admin` applied the migrations: /readyz
/// 503 and sends `503 auth_unavailable` naming the missing schema; ready and
/// accepting once the schema is there.
#[tokio::test]
async fn a_sender_before_the_migrations_is_not_ready_until_the_schema_exists() {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL (Debian's postgresql package) must start");
    let queue = unique_name("auth-unmigrated");
    let sender = start_sender(&pg.url(), &queue, &[]).await;
    let addr = sender.addr.to_string();
    let client = client();
    let unknown = warren_tokens::secret::Secret::generate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = send(&client, &addr, "/send", Some(unknown.as_str()), job()).await;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (503, Some("auth_unavailable"))
        );
        if r.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("warren_migrations"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refusal never named the schema: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_readyz(&client, &addr, 503).await;
    let store = Store::new(
        warren_tokens::pool(&pg.url(), 2).unwrap(),
        Arc::new(SystemClock),
    );
    store.migrate().await.unwrap();
    wait_readyz(&client, &addr, 200).await;
    let (_, secret) = token(&store, "first", Limit::MaxUses(5), None).await;
    let r = send(&client, &addr, "/send", Some(&secret), job()).await;
    assert_eq!(r.status, 202, "{}", r.body);
    sender.shutdown.cancel();
}

//! The token store and gate against a private PostgreSQL cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use warren_testkit::PgNode;
use warren_tokens::store::DenialFilter;
use warren_tokens::{
    Clock, Gate, GateConfig, Limit, ManualClock, NewToken, Reason, Store, SubjectKind, SubjectRef,
    SystemClock, TokenError,
};

async fn database() -> (PgNode, Store) {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL (Debian's postgresql package) must start");
    let store = Store::new(
        warren_tokens::pool(&pg.url(), 4).unwrap(),
        Arc::new(SystemClock),
    );
    store.migrate().await.unwrap();
    (pg, store)
}

fn fast() -> GateConfig {
    GateConfig {
        flush_interval: Duration::from_millis(20),
        idle_return: Duration::from_millis(200),
        ..GateConfig::default()
    }
}

async fn gate(pg: &PgNode, clock: Arc<dyn Clock>) -> Gate {
    let gate = Gate::start(&pg.url(), clock, fast()).unwrap();
    assert!(
        gate.wait_ready(Duration::from_secs(10)).await,
        "gate never became ready"
    );
    gate
}

async fn user_token(store: &Store, name: &str, limit: Limit) -> (uuid::Uuid, String) {
    store.create_user(name, None).await.unwrap();
    let (view, secret) = store
        .create_token(&NewToken {
            subject: SubjectRef {
                kind: SubjectKind::User,
                name: name.into(),
            },
            limit,
            queues: None,
            expires_at: None,
        })
        .await
        .unwrap();
    (view.id, format!("Bearer {}", secret.as_str()))
}

/// Sends once: check, reserve, commit. Returns the refusal reason if refused.
async fn send(gate: &Gate, auth: &str, queue: &str) -> Option<Reason> {
    match gate.check(Some(auth), queue).await {
        Ok(admission) => match admission.reserve().await {
            Ok(ticket) => {
                ticket.commit();
                None
            }
            Err(refusal) => {
                if refusal.reason == Reason::AuthUnavailable {
                    eprintln!("auth unavailable: {}", refusal.detail);
                }
                Some(refusal.reason)
            }
        },
        Err(refusal) => Some(refusal.reason),
    }
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn subjects_and_migrations() {
    let (_pg, store) = database().await;
    assert_eq!(
        store.migrate().await.unwrap(),
        0,
        "migrations applied twice"
    );
    store.create_application("billing").await.unwrap();
    store.create_group("ops").await.unwrap();
    store.create_user("ana", Some("ops")).await.unwrap();
    assert!(matches!(
        store.create_group("ops").await,
        Err(TokenError::Exists { .. })
    ));
    assert!(matches!(
        store.create_user("bob", Some("nobody")).await,
        Err(TokenError::NoSuchSubject { .. })
    ));
    let users = store.subjects(SubjectKind::User).await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].group.as_deref(), Some("ops"));
    let created = store
        .create_token(&NewToken {
            subject: SubjectRef {
                kind: SubjectKind::Application,
                name: "billing".into(),
            },
            limit: Limit::Unlimited,
            queues: Some(vec!["sms".into()]),
            expires_at: None,
        })
        .await
        .unwrap();
    let (view, secret) = created;
    assert!(warren_tokens::secret::well_formed(secret.as_str()));
    assert_eq!(view.hint, secret.hint());
    assert_eq!(view.remaining, None);
    // Only the hash is stored.
    let json = serde_json::to_string(&store.tokens().await.unwrap()).unwrap();
    assert!(!json.contains(&secret.as_str()[4..40]));
}

#[tokio::test]
async fn max_uses_are_exact_and_failed_sends_spend_nothing() {
    let (pg, store) = database().await;
    let gate = gate(&pg, Arc::new(SystemClock)).await;
    let (id, auth) = user_token(&store, "ana", Limit::MaxUses(3)).await;
    // A reserved use that is dropped (the publish failed) is given back.
    let ticket = gate
        .check(Some(&auth), "jobs")
        .await
        .unwrap()
        .reserve()
        .await
        .unwrap();
    drop(ticket);
    for _ in 0..3 {
        assert_eq!(send(&gate, &auth, "jobs").await, None);
    }
    assert_eq!(
        send(&gate, &auth, "jobs").await,
        Some(Reason::UsageExceeded)
    );
    eventually("used written back", Duration::from_secs(5), || async {
        store.token(id).await.unwrap().used == 3
    })
    .await;
    let view = store.token(id).await.unwrap();
    assert_eq!(view.remaining, Some(0));
    eventually("refusal stored", Duration::from_secs(5), || async {
        let denials = store
            .denials(&DenialFilter {
                token_id: Some(id),
                ..Default::default()
            })
            .await
            .unwrap();
        denials
            .iter()
            .any(|d| d.reason == "usage_exceeded" && d.queue.as_deref() == Some("jobs"))
    })
    .await;
    gate.close().await;
}

#[tokio::test]
async fn monthly_limit_resets_at_the_utc_month_boundary() {
    let (pg, store) = database().await;
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    let clock = ManualClock::new(at("2027-01-31T23:59:58Z"));
    let gate = gate(&pg, Arc::new(clock.clone())).await;
    let (_, auth) = user_token(&store, "ana", Limit::Monthly(2)).await;
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    let refusal = gate
        .check(Some(&auth), "jobs")
        .await
        .unwrap()
        .reserve()
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.reason, Reason::MonthlyLimitReached);
    assert_eq!(
        refusal.retry_after,
        Some(2),
        "Retry-After until 2027-02-01T00:00:00Z"
    );
    clock.set(at("2027-02-01T00:00:00Z"));
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    assert_eq!(
        send(&gate, &auth, "jobs").await,
        Some(Reason::MonthlyLimitReached)
    );
    gate.close().await;
    let rows = pg
        .psql("SELECT period || ':' || used || ':' || leased FROM token_usage ORDER BY period")
        .unwrap();
    assert_eq!(rows, "2027-01-01:2:0\n2027-02-01:2:0");
}

#[tokio::test]
async fn unlimited_expiry_queues_and_malformed_tokens() {
    let (pg, store) = database().await;
    let clock = ManualClock::new(Utc::now());
    let gate = gate(&pg, Arc::new(clock.clone())).await;
    store.create_application("billing").await.unwrap();
    let (view, secret) = store
        .create_token(&NewToken {
            subject: SubjectRef {
                kind: SubjectKind::Application,
                name: "billing".into(),
            },
            limit: Limit::Unlimited,
            queues: Some(vec!["sms".into()]),
            expires_at: Some(clock.now() + chrono::Duration::hours(1)),
        })
        .await
        .unwrap();
    let auth = format!("Bearer {}", secret.as_str());
    for _ in 0..100 {
        assert_eq!(send(&gate, &auth, "sms").await, None);
    }
    assert_eq!(
        send(&gate, &auth, "jobs").await,
        Some(Reason::QueueNotAllowed)
    );
    clock.set(clock.now() + chrono::Duration::hours(1));
    assert_eq!(send(&gate, &auth, "sms").await, Some(Reason::TokenExpired));
    eventually("unlimited uses counted", Duration::from_secs(5), || async {
        store.token(view.id).await.unwrap().used == 100
    })
    .await;

    let mut typo = secret.as_str().to_string();
    typo.replace_range(10..11, if &typo[10..11] == "a" { "b" } else { "a" });
    assert_eq!(
        send(&gate, &format!("Bearer {typo}"), "sms").await,
        Some(Reason::InvalidToken)
    );
    let unknown = warren_tokens::secret::Secret::generate().unwrap();
    assert_eq!(
        send(&gate, &format!("Bearer {}", unknown.as_str()), "sms").await,
        Some(Reason::InvalidToken)
    );
    let missing = gate.check(None, "sms").await.err().map(|r| r.reason);
    assert_eq!(missing, Some(Reason::MissingToken));
    eventually(
        "refusals without a token stored",
        Duration::from_secs(5),
        || async {
            let denials = store
                .denials(&DenialFilter {
                    reason: Some(Reason::InvalidToken),
                    ..Default::default()
                })
                .await
                .unwrap();
            denials.len() == 2 && denials.iter().all(|d| d.token_id.is_none())
        },
    )
    .await;
    gate.close().await;
}

#[tokio::test]
async fn two_gates_racing_one_token_get_exactly_the_limit_and_see_a_revocation() {
    let (pg, store) = database().await;
    let a = gate(&pg, Arc::new(SystemClock)).await;
    let b = gate(&pg, Arc::new(SystemClock)).await;
    const LIMIT: u64 = 500;
    let (id, auth) = user_token(&store, "ana", Limit::MaxUses(LIMIT)).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let gate = if i % 2 == 0 { a.clone() } else { b.clone() };
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut refused = 0;
            // Keep going a little past the first refusal: the other gate may still hold uses.
            while refused < 20 {
                match send(&gate, &auth, "jobs").await {
                    None => accepted += 1,
                    Some(Reason::UsageExceeded) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some(other) => panic!("unexpected refusal {other:?}"),
                }
            }
            accepted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, LIMIT, "exactly the limit across two gates");
    eventually("usage written back", Duration::from_secs(5), || async {
        store.token(id).await.unwrap().used == LIMIT
    })
    .await;

    // Revocation reaches both gates within a second.
    let (_, auth2) = user_token(&store, "bob", Limit::Unlimited).await;
    assert_eq!(send(&a, &auth2, "jobs").await, None);
    assert_eq!(send(&b, &auth2, "jobs").await, None);
    let bob = store
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.subject.name == "bob")
        .unwrap();
    store.revoke(bob.id).await.unwrap();
    let revoked_at = Instant::now();
    for gate in [&a, &b] {
        eventually("revocation seen", Duration::from_secs(1), || async {
            send(gate, &auth2, "jobs").await == Some(Reason::TokenRevoked)
        })
        .await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    a.close().await;
    b.close().await;
    let leased = pg.psql("SELECT sum(leased) FROM token_usage").unwrap();
    assert_eq!(leased, "0", "closing returns every lease");
}

#[tokio::test]
async fn database_down_is_auth_unavailable_then_recovers() {
    let (mut pg, store) = database().await;
    let gate = gate(&pg, Arc::new(SystemClock)).await;
    let (_, auth) = user_token(&store, "ana", Limit::MaxUses(1000)).await;
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    pg.kill().await;
    eventually(
        "auth_unavailable while the database is down",
        Duration::from_secs(5),
        || async { send(&gate, &auth, "jobs").await == Some(Reason::AuthUnavailable) },
    )
    .await;
    // Nothing is accepted without a check while it stays down.
    for _ in 0..20 {
        assert_eq!(
            send(&gate, &auth, "jobs").await,
            Some(Reason::AuthUnavailable)
        );
    }
    pg.start_again().await.unwrap();
    eventually("recovered", Duration::from_secs(15), || async {
        send(&gate, &auth, "jobs").await.is_none()
    })
    .await;
    gate.close().await;
}

//! The token store and gate against a private PostgreSQL cluster.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

/// Rows and summed counts per reason in `token_refusals`.
fn refusal_totals(pg: &PgNode) -> (u64, String) {
    let rows: u64 = pg
        .psql("SELECT count(*) FROM token_refusals")
        .unwrap()
        .parse()
        .unwrap();
    let sums = pg
        .psql(
            "SELECT reason || '=' || sum(count) FROM token_refusals GROUP BY reason ORDER BY reason",
        )
        .unwrap();
    (rows, sums)
}

#[tokio::test]
async fn a_flood_of_refusals_keeps_every_count_in_a_bounded_number_of_rows() {
    let (pg, store) = database().await;
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    let clock = ManualClock::new(at("2027-03-10T12:00:05Z"));
    let a = gate(&pg, Arc::new(clock.clone())).await;
    let b = gate(&pg, Arc::new(clock.clone())).await;
    let (id, auth) = user_token(&store, "ana", Limit::MaxUses(1)).await;
    assert_eq!(send(&a, &auth, "jobs").await, None);
    // Two replicas, each hit by the same flood: a spent token, malformed
    // secrets and requests without any token (one client, no known token).
    const N: usize = 1500;
    for gate in [&a, &b] {
        for i in 0..N {
            assert_eq!(send(gate, &auth, "jobs").await, Some(Reason::UsageExceeded));
            let garbage = format!("Bearer wrn_{i:064x}");
            assert_eq!(
                send(gate, &garbage, "jobs").await,
                Some(Reason::InvalidToken)
            );
            assert_eq!(
                gate.check(None, "jobs").await.err().map(|r| r.reason),
                Some(Reason::MissingToken)
            );
        }
    }
    a.close().await;
    b.close().await;
    assert_eq!(a.refusals_dropped() + b.refusals_dropped(), 0);
    let (rows, sums) = refusal_totals(&pg);
    let expected = format!(
        "invalid_token={n}\nmissing_token={n}\nusage_exceeded={n}",
        n = 2 * N
    );
    assert_eq!(sums, expected, "every refusal counted");
    // Per replica 10 single rows for the token and 10 for "no token"; the
    // per-minute buckets (token × reason × queue) are shared by the replicas.
    assert!(
        rows <= 2 * (10 + 10) + 3,
        "{rows} rows for {} refusals",
        6 * N
    );
    let buckets = pg
        .psql("SELECT count(*) FROM token_refusals WHERE span = 'minute'")
        .unwrap();
    assert_eq!(
        buckets, "3",
        "one bucket per (token, reason, queue, minute)"
    );
    let listed = store
        .denials(&DenialFilter {
            token_id: Some(id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|d| d.count).sum::<u64>(),
        2 * N as u64,
        "the admin API shows the aggregated counts"
    );

    // The next minute of the same flood adds rows again, within the same bound.
    let c = gate(&pg, Arc::new(clock.clone())).await;
    clock.set(at("2027-03-10T12:01:05Z"));
    for _ in 0..N {
        assert_eq!(send(&c, &auth, "jobs").await, Some(Reason::UsageExceeded));
    }
    c.close().await;
    assert_eq!(refusal_totals(&pg).0, rows + 10 + 1);
    // Rows older than 24 h fold into one per (token, reason, queue, UTC day):
    // first the first minute's, then the second's.
    clock.set(at("2027-03-11T12:00:30Z"));
    let done = c.compact_refusals().await.unwrap();
    assert_eq!((done.skipped, done.folded, done.deleted), (false, rows, 0));
    assert_eq!(refusal_totals(&pg).0, 3 + 10 + 1);
    clock.set(at("2027-03-11T12:30:00Z"));
    assert_eq!(c.compact_refusals().await.unwrap().folded, 11);
    let (rows, sums) = refusal_totals(&pg);
    assert_eq!(rows, 3, "one row per token, reason, queue and day");
    assert_eq!(
        sums,
        format!(
            "invalid_token={n}\nmissing_token={n}\nusage_exceeded={m}",
            n = 2 * N,
            m = 3 * N
        ),
        "folding keeps the counts"
    );
    let spans = pg
        .psql("SELECT DISTINCT span || ' ' || to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM token_refusals")
        .unwrap();
    assert_eq!(spans, "day 2027-03-10 00:00");
    // Deleted once their whole day is past the retention (90 days).
    clock.set(at("2027-06-08T23:59:59Z"));
    assert_eq!(c.compact_refusals().await.unwrap().deleted, 0);
    clock.set(at("2027-06-09T00:00:00Z"));
    assert_eq!(c.compact_refusals().await.unwrap().deleted, 3);
    assert_eq!(refusal_totals(&pg).0, 0);
}

#[tokio::test]
async fn a_slow_body_meets_the_revocation_or_expiry_that_came_meanwhile() {
    let (pg, store) = database().await;
    let clock = ManualClock::new(Utc::now());
    let gate = gate(&pg, Arc::new(clock.clone())).await;
    store.create_application("billing").await.unwrap();
    let expires_at = clock.now() + chrono::Duration::minutes(5);
    let (_, expiring) = store
        .create_token(&NewToken {
            subject: SubjectRef {
                kind: SubjectKind::Application,
                name: "billing".into(),
            },
            limit: Limit::MaxUses(10),
            queues: None,
            expires_at: Some(expires_at),
        })
        .await
        .unwrap();
    let expiring = format!("Bearer {}", expiring.as_str());
    // Checked before the body arrived; the body ends at the expiry.
    let admission = gate.check(Some(&expiring), "jobs").await.unwrap();
    clock.set(expires_at);
    assert_eq!(
        admission.reserve().await.err().map(|r| r.reason),
        Some(Reason::TokenExpired),
        "refused at its expiry"
    );

    let (id, auth) = user_token(&store, "ana", Limit::Unlimited).await;
    let admission = gate.check(Some(&auth), "jobs").await.unwrap();
    store.revoke(id).await.unwrap();
    let revoked_at = Instant::now();
    // Until the notification arrives, sends may still be accepted: count them.
    let mut accepted = 0;
    loop {
        match send(&gate, &auth, "jobs").await {
            Some(Reason::TokenRevoked) => break,
            None => accepted += 1,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "revocation not seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        admission.reserve().await.err().map(|r| r.reason),
        Some(Reason::TokenRevoked),
        "a request checked before the revocation takes no use after it"
    );
    gate.close().await;
    let used = store.token(id).await.unwrap().used;
    assert_eq!(used, accepted, "only the sends before the notification");
}

/// A flood of well-formed random secrets: refused as unknown in a few
/// batched queries, repeated ones from memory; a token that takes one of
/// those secrets afterwards is accepted once the unknown TTL has passed.
#[tokio::test]
async fn unknown_secrets_cost_batched_queries_and_are_forgotten_after_their_ttl() {
    let (pg, store) = database().await;
    let clock = ManualClock::new(Utc::now());
    let gate = gate(&pg, Arc::new(clock.clone())).await;
    let secrets: Vec<String> = (0..1000)
        .map(|_| {
            let secret = warren_tokens::secret::Secret::generate().unwrap();
            format!("Bearer {}", secret.as_str())
        })
        .collect();
    let refused_as_unknown = |results: Vec<Result<_, warren_tokens::Refusal>>| {
        results
            .into_iter()
            .filter(|r| matches!(r, Err(refusal) if refusal.reason == Reason::InvalidToken))
            .count()
    };
    let before = gate.lookup_queries();
    let flood = futures::future::join_all(secrets.iter().map(|s| gate.check(Some(s), "jobs")));
    assert_eq!(refused_as_unknown(flood.await), 1000);
    let queries = gate.lookup_queries() - before;
    assert!(
        (1..=10).contains(&queries),
        "1000 unknown secrets cost {queries} queries"
    );
    // The same secrets again: answered from memory, no query.
    for _ in 0..3 {
        let again = futures::future::join_all(secrets.iter().map(|s| gate.check(Some(s), "jobs")));
        assert_eq!(refused_as_unknown(again.await), 1000);
    }
    assert_eq!(gate.lookup_queries() - before, queries);

    // A token now stored with the first of those secrets (as if it had been
    // created after the secret was tried).
    let (id, _) = user_token(&store, "late", Limit::Unlimited).await;
    let hash = warren_tokens::secret::hash(secrets[0].trim_start_matches("Bearer "));
    pg.psql(&format!(
        "UPDATE tokens SET secret_hash = '\\x{}' WHERE id = '{id}'",
        hex::encode(hash)
    ))
    .unwrap();
    assert_eq!(
        send(&gate, &secrets[0], "jobs").await,
        Some(Reason::InvalidToken),
        "within the TTL the secret is still unknown here"
    );
    clock.set(clock.now() + chrono::Duration::from_std(fast().unknown_ttl).unwrap());
    assert_eq!(
        send(&gate, &secrets[0], "jobs").await,
        None,
        "after the TTL the new token is found"
    );
    // One lookup found it (a second one if the UPDATE's notification came
    // in between and made the gate read it again).
    let after = gate.lookup_queries() - before;
    assert!(
        (queries + 1..=queries + 2).contains(&after),
        "{after} queries after {queries}"
    );
    gate.close().await;
}

/// A gate started before the admin applied the migrations: not ready,
/// every check `auth_unavailable` naming the missing schema; ready once the
/// schema is there.
#[tokio::test]
async fn a_gate_before_the_migrations_waits_for_the_schema() {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL (Debian's postgresql package) must start");
    let gate = Gate::start(&pg.url(), Arc::new(SystemClock), fast()).unwrap();
    let malformed_free = warren_tokens::secret::Secret::generate().unwrap();
    let auth = format!("Bearer {}", malformed_free.as_str());
    eventually(
        "the schema named in the refusal",
        Duration::from_secs(10),
        || async {
            match gate.check(Some(&auth), "jobs").await {
                Err(refusal) => {
                    assert_eq!(refusal.reason, Reason::AuthUnavailable);
                    assert!(!gate.is_ready());
                    refusal.detail.contains("warren_migrations")
                }
                Ok(_) => panic!("a check passed without a schema"),
            }
        },
    )
    .await;
    let store = Store::new(
        warren_tokens::pool(&pg.url(), 2).unwrap(),
        Arc::new(SystemClock),
    );
    store.migrate().await.unwrap();
    assert!(
        gate.wait_ready(Duration::from_secs(15)).await,
        "the gate never saw the schema"
    );
    let (_, auth) = user_token(&store, "first", Limit::MaxUses(5)).await;
    assert_eq!(send(&gate, &auth, "jobs").await, None);
    gate.close().await;
}

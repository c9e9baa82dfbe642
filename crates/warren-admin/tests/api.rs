//! The admin JSON API and the panel's session and cross-site checks, against a private PostgreSQL.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::{Value, json};
use support::{ADMIN, start_admin};
use warren_testkit::PgNode;

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    warren_telemetry::install_crypto_provider();
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn the_json_api_creates_lists_shows_and_revokes() {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL must start");
    let admin = start_admin(&pg).await;
    let base = format!("http://{}", admin.addr);
    use reqwest::Method;
    let (status, body) = call(Method::GET, format!("{base}/api/tokens"), None, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("admin_token_required"))
    );
    let (status, _) = call(
        Method::GET,
        format!("{base}/api/tokens"),
        Some("wrong-token-wrong-token"),
        None,
    )
    .await;
    assert_eq!(status, 401);

    let a = Some(ADMIN);
    let (status, app) = call(
        Method::POST,
        format!("{base}/api/applications"),
        a,
        Some(json!({"name": "billing"})),
    )
    .await;
    assert_eq!(status, 201, "{app}");
    assert!(app["id"].as_str().is_some());
    let (status, _) = call(
        Method::POST,
        format!("{base}/api/groups"),
        a,
        Some(json!({"name": "ops"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, user) = call(
        Method::POST,
        format!("{base}/api/users"),
        a,
        Some(json!({"name": "ana", "group": "ops"})),
    )
    .await;
    assert_eq!((status, user["group"].as_str()), (201, Some("ops")));
    let (status, dup) = call(
        Method::POST,
        format!("{base}/api/groups"),
        a,
        Some(json!({"name": "ops"})),
    )
    .await;
    assert_eq!(
        (status, dup["code"].as_str()),
        (409, Some("already_exists"))
    );
    let (status, _) = call(
        Method::POST,
        format!("{base}/api/users"),
        a,
        Some(json!({"name": "bob", "group": "nope"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        Method::POST,
        format!("{base}/api/tokens"),
        a,
        Some(json!({"subject": {"kind": "user"}})),
    )
    .await;
    assert_eq!(status, 422);

    let (status, created) = call(
        Method::POST,
        format!("{base}/api/tokens"),
        a,
        Some(json!({
            "subject": {"kind": "user", "name": "ana"},
            "limit": {"kind": "monthly", "value": 1000},
            "queues": ["jobs"],
            "expires_at": "2099-01-01T00:00:00Z"
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["token"].as_str().unwrap();
    assert!(warren_tokens::secret::well_formed(secret));
    assert_eq!(created["used"], 0);
    assert_eq!(created["remaining"], 1000);
    assert_eq!(created["period"]["kind"], "monthly");
    let id = created["id"].as_str().unwrap();

    let (status, list) = call(Method::GET, format!("{base}/api/tokens"), a, None).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(
        !list.to_string().contains(secret),
        "the secret is shown only at creation"
    );
    let (status, unlimited) = call(
        Method::POST,
        format!("{base}/api/tokens"),
        a,
        Some(json!({"subject": {"kind": "application", "name": "billing"}, "limit": {"kind": "unlimited"}})),
    )
    .await;
    assert_eq!((status, &unlimited["remaining"]), (201, &Value::Null));

    let (status, _) = call(Method::DELETE, format!("{base}/api/tokens/{id}"), a, None).await;
    assert_eq!(status, 204);
    let (status, shown) = call(Method::GET, format!("{base}/api/tokens/{id}"), a, None).await;
    assert_eq!((status, &shown["revoked"]), (200, &json!(true)));
    let (status, denials) = call(
        Method::GET,
        format!("{base}/api/tokens/{id}/denials"),
        a,
        None,
    )
    .await;
    assert_eq!((status, denials), (200, json!([])));
    let (status, _) = call(
        Method::GET,
        format!("{base}/api/tokens/{}", uuid::Uuid::new_v4()),
        a,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, usage) = call(
        Method::GET,
        format!("{base}/api/tokens/{id}/usage?days=7"),
        a,
        None,
    )
    .await;
    assert_eq!(
        (status, usage["days"].as_array().map(Vec::len)),
        (200, Some(7))
    );
}

#[tokio::test]
async fn the_panel_needs_a_session_and_refuses_cross_site_posts() {
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL must start");
    let admin = start_admin(&pg).await;
    let base = format!("http://{}", admin.addr);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client.get(format!("{base}/tokens")).send().await.unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["location"].to_str().unwrap()
        ),
        (303, "/login")
    );
    let r = client
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", "not-the-admin-token")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/login?failed=1");
    assert!(r.headers().get("set-cookie").is_none());
    let r = client
        .post(format!("{base}/login"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", ADMIN)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "cross-site login");
    let r = client
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", ADMIN)]))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let r = client
        .get(format!("{base}/tokens"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .post(format!("{base}/groups"))
        .header("cookie", &session)
        .header("sec-fetch-site", "cross-site")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("name", "evil")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = client
        .post(format!("{base}/groups"))
        .header("cookie", &session)
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("name", "ops")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let page = client
        .get(format!("{base}/groups"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(">ops<") && !page.contains("evil"), "{page}");
}

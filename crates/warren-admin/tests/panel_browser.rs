//! The panel in a real headless Chromium (Debian's `chromium` through
//! `chromedriver`): log in, create a user and a token limited to 3 uses, send
//! 3 jobs with it (202), the 4th is refused (429), the refusal shows in the
//! panel with its reason, revoke it, the next send is 401. Screenshots go to
//! `$WARREN_SCREENSHOT_DIR` (the README's come from here) or a temporary directory.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_testkit::{PgNode, free_port, shared_amqp_url, unique_name};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = free_port().unwrap();
    let driver =
        Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) must be installed");
    let driver = Driver(driver);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1180,820"]
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await;
        match connected {
            Ok(client) => return (driver, client),
            Err(err) => {
                assert!(Instant::now() < deadline, "cannot drive chromium: {err}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

async fn screenshot(client: &Client, name: &str) {
    let dir = std::env::var("WARREN_SCREENSHOT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join(name), png).unwrap();
}

async fn fill(client: &Client, css: &str, text: &str) {
    let field = client.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// The element, once the page (perhaps still navigating after a click) has it.
async fn wait_for(client: &Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
}

/// The text of the element once the page has it. A click that posts a form
/// navigates: an element found just before the new page replaces the old one
/// goes stale, so a stale read is retried on the new page, not a failure.
async fn text_of(client: &Client, css: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match wait_for(client, css).await.text().await {
            Ok(text) => return text,
            Err(err) => {
                assert!(Instant::now() < deadline, "cannot read {css}: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send(addr: &str, secret: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/send"))
        .bearer_auth(secret)
        .json(&json!({"message": "from the panel test"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (status, body["code"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn panel_scenario_in_headless_chromium() {
    warren_telemetry::install_crypto_provider();
    let pg = PgNode::start()
        .await
        .expect("a private PostgreSQL must start");
    let admin = support::start_admin(&pg).await;
    let base = format!("http://{}", admin.addr);
    let sender_args = warren_sender::Args::try_parse_from([
        "warren-sender",
        "--amqp-url",
        &shared_amqp_url(),
        "--queue",
        &unique_name("panel"),
        "--listen-addr",
        "127.0.0.1:0",
        "--auth",
        "required",
        "--database-url",
        &pg.url(),
    ])
    .unwrap();
    let sender = warren_sender::start(&sender_args, CancellationToken::new())
        .await
        .unwrap();
    assert!(
        sender
            .publisher
            .wait_connected(Duration::from_secs(30))
            .await
    );
    let sender_addr = sender.addr.to_string();

    let (_driver, client) = browser().await;
    client.goto(&format!("{base}/tokens")).await.unwrap();
    assert!(
        client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/login")
    );
    fill(&client, "#token", support::ADMIN).await;
    click(&client, "#login").await;
    wait_for(&client, "#tokens").await;

    client.goto(&format!("{base}/users")).await.unwrap();
    fill(&client, "#user-name", "ana").await;
    click(&client, "#create-user").await;
    assert_eq!(
        text_of(&client, "table tr:nth-child(2) td").await,
        "ana",
        "the user is listed"
    );

    client.goto(&format!("{base}/tokens")).await.unwrap();
    client
        .find(Locator::Css("#subject-kind"))
        .await
        .unwrap()
        .select_by_value("user")
        .await
        .unwrap();
    fill(&client, "#subject-name", "ana").await;
    client
        .find(Locator::Css("#limit-kind"))
        .await
        .unwrap()
        .select_by_value("max_uses")
        .await
        .unwrap();
    fill(&client, "#limit-value", "3").await;
    click(&client, "#create-token").await;
    let secret = text_of(&client, "#secret").await;
    assert!(
        warren_tokens::secret::well_formed(secret.trim()),
        "{secret:?}"
    );
    let secret = secret.trim().to_string();
    screenshot(&client, "panel-token-created.png").await;
    let token_page = client
        .find(Locator::Css("#token-link"))
        .await
        .unwrap()
        .attr("href")
        .await
        .unwrap()
        .expect("a link to the token");

    // The sender may still be connecting its listener: wait until it checks tokens.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = send(&sender_addr, &secret).await;
    while first.0 == 503 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = send(&sender_addr, &secret).await;
    }
    assert_eq!(first.0, 202, "{first:?}");
    for _ in 0..2 {
        assert_eq!(send(&sender_addr, &secret).await.0, 202);
    }
    assert_eq!(
        send(&sender_addr, &secret).await,
        (429, "usage_exceeded".to_string())
    );

    // The refusal shows in the panel with its reason (stored within a second or so).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        client.goto(&format!("{base}/refusals")).await.unwrap();
        let reasons = client
            .find_all(Locator::Css("#refusals td.reason"))
            .await
            .unwrap();
        let mut texts = Vec::new();
        for cell in reasons {
            // A stale cell (the page still loading) counts as not shown yet.
            if let Ok(text) = cell.text().await {
                texts.push(text);
            }
        }
        if texts.iter().any(|t| t == "usage_exceeded") {
            break;
        }
        assert!(Instant::now() < deadline, "refusal not shown: {texts:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    screenshot(&client, "panel-refusals.png").await;

    client.goto(&format!("{base}{token_page}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used = text_of(&client, "#used").await;
        if used == "3" {
            break;
        }
        assert!(Instant::now() < deadline, "used shows {used}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.refresh().await.unwrap();
    }
    assert_eq!(text_of(&client, "#remaining").await, "0");
    assert!(
        client.find(Locator::Css("#uses-chart rect")).await.is_ok(),
        "the uses-per-day chart"
    );
    screenshot(&client, "panel-usage.png").await;
    click(&client, "#revoke").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while text_of(&client, "#state").await != "revoked" {
        assert!(
            Instant::now() < deadline,
            "the panel never showed the token revoked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.refresh().await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let (status, code) = send(&sender_addr, &secret).await;
        if status == 401 {
            assert_eq!(code, "token_revoked");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} {code} a second after revoking"
        );
    }
    client.close().await.unwrap();
    sender.shutdown.cancel();
}

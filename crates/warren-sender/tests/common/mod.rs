//! What the sender's integration tests share: a sender started in-process
//! the way the binary starts it, and an HTTP client.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_sender::{Args, RunningSender};

/// Starts a sender on a free loopback port publishing to `queue` on
/// `amqp_url`, with more flags in `extra`; returns once it is connected.
pub async fn start_sender(amqp_url: &str, queue: &str, extra: &[&str]) -> RunningSender {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warren=debug,info")
        .with_test_writer()
        .try_init();
    let mut argv = vec![
        "warren-sender".to_string(),
        "--amqp-url".into(),
        amqp_url.into(),
        "--queue".into(),
        queue.into(),
        "--listen-addr".into(),
        "127.0.0.1:0".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::try_parse_from(argv).unwrap();
    let sender = warren_sender::start(&args, CancellationToken::new())
        .await
        .unwrap();
    assert!(
        sender
            .publisher
            .wait_connected(Duration::from_secs(30))
            .await,
        "the sender never connected to {amqp_url}"
    );
    sender
}

pub fn client() -> reqwest::Client {
    warren_telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

//! Shared by the admin tests: an admin server on a private PostgreSQL.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren_admin::{DbArgs, RunningAdmin, ServeArgs};
use warren_testkit::PgNode;

pub const ADMIN: &str = "test-admin-token-0123456789";

pub async fn start_admin(pg: &PgNode) -> RunningAdmin {
    warren_telemetry::install_crypto_provider();
    let db = DbArgs {
        database_url: pg.url(),
    };
    let args = ServeArgs {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        admin_token: ADMIN.into(),
        secure_cookie: false,
        session_hours: 1,
    };
    let admin = warren_admin::serve(&db, &args, CancellationToken::new())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    for _ in 0..300 {
        let ready = client
            .get(format!("http://{}/readyz", admin.addr))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            return admin;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("warren-admin never became ready");
}

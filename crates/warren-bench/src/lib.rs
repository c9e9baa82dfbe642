//! What the benchmark binaries (`pipeline-bench`, `worker-bench`) share.

use std::path::Path;

use anyhow::{Context, bail};
use warren_testkit::{RabbitNode, RabbitOptions};

/// Fails with a hint when one of the programs a benchmark runs is missing.
pub fn require_files(files: &[(&str, &Path)]) -> anyhow::Result<()> {
    for (what, path) in files {
        if !path.exists() {
            bail!(
                "{what} not found at {} (run `make bench`, which builds and installs them)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Starts the private RabbitMQ node a benchmark measures against.
pub async fn private_node() -> anyhow::Result<RabbitNode> {
    eprintln!("starting a private RabbitMQ node...");
    RabbitNode::start(RabbitOptions::default())
        .await
        .context("starting RabbitMQ")
}

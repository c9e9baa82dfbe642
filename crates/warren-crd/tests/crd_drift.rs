//! The checked-in CRD YAML must equal what the Rust types generate.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn assert_matches_generated(relative: &str) {
    let generated = warren_crd::crd_yaml().unwrap();
    let path = repo_root().join(relative);
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make crds`", path.display()));
    assert!(
        checked_in == generated,
        "{relative} differs from the CRD generated from crates/warren-crd; run `make crds`"
    );
}

#[test]
fn manifests_crd_matches_the_rust_types() {
    assert_matches_generated("manifests/crds.yaml");
}

#[test]
fn chart_crd_matches_the_rust_types() {
    assert_matches_generated("charts/warren/crds/queuescaler.yaml");
}

//! The checked-in CRD YAML must equal what the Rust types generate.

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

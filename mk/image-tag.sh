#!/usr/bin/env bash
# Prints the content-addressed image tag, dev-<12 hex digits>: a SHA-256 over everything
# the images are built from (Dockerfile, pinned versions, workspace manifests, crates), so
# it changes exactly when an image input changes. Uses sha256sum (GNU), shasum (macOS,
# BSD) or openssl, whichever is present; with none of them it fails and says so rather
# than printing a constant tag.
set -euo pipefail
cd "$(dirname "$0")/.."

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum
  elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256
  elif command -v openssl >/dev/null 2>&1; then
    openssl dgst -sha256 -r
  else
    echo "image-tag: no SHA-256 tool found (need sha256sum, shasum or openssl)" >&2
    return 1
  fi
}

inputs() {
  printf '%s\n' Dockerfile mk/versions.env Cargo.toml Cargo.lock
  find crates -type f -not -path '*/target/*' | LC_ALL=C sort
}

files="$(inputs)"
# Hash names and contents, so a renamed file changes the tag too.
digest="$( { printf '%s\n' "$files"; while IFS= read -r f; do cat -- "$f"; done <<<"$files"; } | sha256)"
digest="${digest%% *}"
if ! [[ "$digest" =~ ^[0-9a-f]{64}$ ]]; then
  echo "image-tag: unexpected digest output: $digest" >&2
  exit 1
fi
echo "dev-${digest:0:12}"

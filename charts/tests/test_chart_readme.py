"""charts/warren/README.md is generated from values.yaml's comments (mk/chart_readme.py):
it is up to date, lists every value with its default, and an undocumented value fails."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from conftest import CHART, REPO

GENERATOR = REPO / "mk" / "chart_readme.py"
ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>[^|]*) \| (?P<default>(?:[^|\\]|\\.)*) \| (?P<description>.*) \|$")


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60)


def readme_rows() -> dict[str, dict[str, str]]:
    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group("key")] = {k: v.replace("\\|", "|") for k, v in match.groupdict().items()}
    return rows


def test_the_chart_readme_is_up_to_date():
    proc = generate("--check")
    assert proc.returncode == 0, f"charts/warren/README.md is stale: run `make chart-readme`\n{proc.stdout}{proc.stderr}"


def test_the_readme_lists_every_value_with_its_default_and_a_description():
    """Each leaf of values.yaml (or a mapping documented as one value) has a row whose
    default parses back to the value itself."""
    rows = readme_rows()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    listed = []

    def walk(value, path):
        if path in rows and rows[path]["default"]:
            default = rows[path]["default"]
            assert default.startswith("`") and default.endswith("`"), (path, default)
            assert yaml.safe_load(default[1:-1]) == value, (path, default, value)
            assert rows[path]["description"].strip(), path
            assert rows[path]["type"].strip() not in ("", "any"), path
            listed.append(path)
        elif isinstance(value, dict) and value:
            for key, child in value.items():
                walk(child, f"{path}.{key}" if path else key)
        else:
            raise AssertionError(f"{path} has no row in charts/warren/README.md")

    walk(values, "")
    assert len(listed) > 100
    assert set(r for r, row in rows.items() if row["default"]) == set(listed)


def test_a_value_without_a_comment_is_refused(tmp_path):
    values = (CHART / "values.yaml").read_text().replace(
        "  # -- Retry-After (seconds) on every 503 the sender gives (WARREN_RETRY_AFTER_SECONDS).\n", "")
    changed = tmp_path / "values.yaml"
    changed.write_text(values)
    proc = generate("--values", str(changed), "--output", "-")
    assert proc.returncode != 0
    assert "sender.retryAfterSeconds" in proc.stderr, proc.stderr


def test_a_changed_value_makes_the_readme_stale(tmp_path):
    changed = tmp_path / "values.yaml"
    changed.write_text((CHART / "values.yaml").read_text().replace("retryAfterSeconds: 2\n", "retryAfterSeconds: 3\n"))
    proc = generate("--values", str(changed), "--check")
    assert proc.returncode == 1, proc.stderr
    assert "+| `sender.retryAfterSeconds` | integer | `3` |" in proc.stdout, proc.stdout

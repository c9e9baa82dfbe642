"""mk/check_sizes.py, the size bar of `make lint`: what it counts, what it leaves out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "mk" / "check_sizes.py"


def crate(root: Path, name: str, source: str) -> None:
    src = root / "crates" / name / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "lib.rs").write_text(source)


def run(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *flags],
        capture_output=True,
        text=True,
        check=False,
    )


def function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    let _x{i} = {i};\n" for i in range(body_lines))
    return f"{indent}fn {name}() {{\n{body}{indent}}}\n"


def test_a_long_product_function_is_named_and_strict_mode_fails(tmp_path):
    crate(tmp_path, "warren-worker", function("short", 78) + function("long", 79))
    report = run(tmp_path)
    assert report.returncode == 0, report.stderr
    assert "fn long is 81 lines" in report.stdout
    assert "fn short" not in report.stdout, "80 lines is within the bar"
    strict = run(tmp_path, "--strict")
    assert strict.returncode == 1
    assert "fn long is 81 lines" in strict.stdout


def test_tests_strings_and_comments_do_not_count(tmp_path):
    source = (
        "/// Braces in text: { {\n"
        'const OPEN: &str = "{ { {";\n'
        "const QUOTE: char = '{';\n"
        "fn lifetime<'a>(x: &'a str) -> &'a str { x }\n"
        "// fn commented() {\n"
        "#[cfg(test)]\n"
        "mod tests {\n" + function("long_test_helper", 200, "    ") + "}\n"
    )
    source += "#[test]\n" + function("long_test", 200)
    crate(tmp_path, "warren-broker", source)
    result = run(tmp_path, "--strict")
    assert result.returncode == 0, result.stdout
    assert "0 over the bar" in result.stdout


def test_a_file_counts_its_product_lines_only(tmp_path):
    product = "".join(f"const C{i}: u32 = {i};\n" for i in range(601))
    crate(tmp_path, "warren-sender", product)
    assert "lib.rs: 601 lines" in run(tmp_path).stdout
    tests = "#[cfg(test)]\nmod tests {\n" + "    const T: u32 = 0;\n" * 50 + "}\n"
    crate(tmp_path, "warren-sender", product[: -len("const C600: u32 = 600;\n")] + tests)
    assert "0 over the bar" in run(tmp_path, "--strict").stdout


def test_test_support_crates_are_not_product(tmp_path):
    crate(tmp_path, "warren-worker", function("fine", 3))
    crate(tmp_path, "warren-e2e", function("long", 500))
    result = run(tmp_path, "--strict")
    assert result.returncode == 0, result.stdout

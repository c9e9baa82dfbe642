#!/usr/bin/env python3
"""Size bar for warren's product code: no function over 80 lines, no file over 600.

Product code is the src/ of the crates listed in PRODUCT_CRATES. Test code does not
count: items under `#[cfg(test)]` (test modules, test-only functions) and `#[test]`
functions are left out of both measures, as are tests/, benches/ and examples/ (not
under src/) and the test-support crates (warren-e2e, warren-testkit,
warren-bench), which are not listed.

A function's length is the number of source lines from the line of its `fn` keyword to
the line of its closing brace (doc comments and attributes above it aside). A file's
length is its line count minus the lines of its test items.

    python3 mk/check_sizes.py            # report: print the offenders, exit 0
    python3 mk/check_sizes.py --strict   # fail (exit 1) when there is an offender

Standard library only: `make lint` runs it on a bare machine.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600
PRODUCT_CRATES = (
    "warren-sender",
    "warren-worker",
    "warren-controller",
    "warren-admin",
    "warren-broker",
    "warren-tokens",
    "warren-events",
    "warren-telemetry",
    "warren-scaling",
    "warren-crd",
    "warren-dashboards",
)

# A char literal: 'a', '\n', '\'', '\u{1F600}'. Anything else after a quote is a lifetime.
CHAR_LITERAL = re.compile(r"'(?:\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'\n])'")
RAW_STRING = re.compile(r'b?r(#*)"')
FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")
TEST_ATTRIBUTE = re.compile(r"#\[\s*(?:cfg\s*\(\s*(?:all\s*\(|any\s*\()?\s*test\b|test\s*\])")


def blank(text: str, start: int, end: int, out: list[str]) -> None:
    """Replaces text[start:end] in `out` by spaces, keeping the newlines."""
    for i in range(start, end):
        if text[i] != "\n":
            out[i] = " "


def code_only(text: str) -> str:
    """`text` with comments, strings and char literals blanked (newlines kept), so that
    braces and keywords left are the code's own."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(text, i, end, out)
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(text, i, j, out)
            i = j
        elif (c in "rb") and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) and (
            match := RAW_STRING.match(text, i)
        ):
            closing = '"' + match.group(1)
            end = text.find(closing, match.end())
            end = n if end < 0 else end + len(closing)
            blank(text, i, end, out)
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(text, i, j + 1, out)
            i = j + 1
        elif c == "'":
            match = CHAR_LITERAL.match(text, i)
            if match:
                blank(text, i, match.end(), out)
                i = match.end()
            else:
                i += 1  # a lifetime
        else:
            i += 1
    return "".join(out)


def matching_brace(code: str, open_at: int) -> int:
    """The index of the `}` closing the `{` at `open_at` (the end of the text if none)."""
    depth = 0
    for i in range(open_at, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(code) - 1


def body_start(code: str, start: int) -> int | None:
    """Where the item starting at `start` opens its body: the first `{` outside
    parentheses and brackets, or None when a `;` comes first (a declaration)."""
    depth = 0
    for i in range(start, len(code)):
        ch = code[i]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch == "{":
            return i
        elif depth == 0 and ch == ";":
            return None
    return None


def line_of(code: str, index: int) -> int:
    return code.count("\n", 0, index) + 1


def attribute_end(code: str, start: int) -> int:
    """The index just past the `]` closing the attribute `#[` at `start`."""
    depth = 0
    for i in range(start + 1, len(code)):
        if code[i] == "[":
            depth += 1
        elif code[i] == "]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(code)


def test_ranges(code: str) -> list[tuple[int, int]]:
    """Line ranges (inclusive) of the items marked `#[cfg(test)]` or `#[test]`."""
    ranges = []
    for match in TEST_ATTRIBUTE.finditer(code):
        opened = body_start(code, attribute_end(code, match.start()))
        if opened is None:
            continue
        ranges.append((line_of(code, match.start()), line_of(code, matching_brace(code, opened))))
    return ranges


def measure(path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    """The file's product line count and its product functions as (name, line, length)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    code = code_only(text)
    tests = test_ranges(code)

    def in_tests(line: int) -> bool:
        return any(first <= line <= last for first, last in tests)

    total = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    test_lines = set()
    for first, last in tests:
        test_lines.update(range(first, last + 1))
    functions = []
    for match in FN.finditer(code):
        line = line_of(code, match.start())
        if in_tests(line):
            continue
        opened = body_start(code, match.end())
        if opened is None:
            continue
        last = line_of(code, matching_brace(code, opened))
        functions.append((match.group(1), line, last - line + 1))
    return total - len(test_lines), functions


def product_files(root: Path) -> list[Path]:
    files = []
    for crate in PRODUCT_CRATES:
        files.extend(sorted((root / "crates" / crate / "src").rglob("*.rs")))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when there is an offender")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()

    offenders = []
    files = product_files(args.root)
    for path in files:
        shown = path.relative_to(args.root)
        lines, functions = measure(path)
        if lines > MAX_FILE_LINES:
            offenders.append(f"{shown}: {lines} lines (max {MAX_FILE_LINES})")
        for name, line, length in functions:
            if length > MAX_FUNCTION_LINES:
                offenders.append(
                    f"{shown}:{line}: fn {name} is {length} lines (max {MAX_FUNCTION_LINES})"
                )
    if not files:
        print("check_sizes: no product source found under", args.root, file=sys.stderr)
        return 1
    for offender in offenders:
        print(offender)
    mode = "failing" if args.strict else "report only"
    print(
        f"check_sizes: {len(offenders)} over the bar in {len(files)} product files "
        f"(functions <= {MAX_FUNCTION_LINES} lines, files <= {MAX_FILE_LINES}; {mode})"
    )
    return 1 if offenders and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())

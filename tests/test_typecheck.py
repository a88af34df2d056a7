"""mypy --strict on tests/typecheck/: what the type checker catches of a service's implementation, and what not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent / "typecheck"
ROOT = SAMPLES.parent.parent


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_mypy_reports_exactly_the_marked_errors(sample: Path, tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path), "--no-error-summary"]
    out, err, status = api.run([*args, str(sample)])
    assert not err, err
    got = sorted(
        (int(m[1]), m[2]) for m in re.finditer(r"^[^\n]*?:(\d+): error: [^\n]*\[([\w-]+)\]$", out, re.MULTILINE)
    )
    lines = sample.read_text().splitlines()
    expected = sorted((n, m[1]) for n, line in enumerate(lines, 1) if (m := re.search(r"# E: ([\w-]+)$", line)))
    assert expected, "a sample with no marked error checks nothing"
    assert got == expected, out
    assert status == 1

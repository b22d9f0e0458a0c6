"""The code's own gates, run on every `./dev.sh test` (issue 9): ruff's rules of
pyproject.toml — among them C901/PLR0915, no function over cyclomatic complexity 15
or 50 statements — and mypy --strict over relay, push and pbxcore."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_ruff_finds_nothing() -> None:
    out = _run("ruff", "check", "--no-cache", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_would_catch_a_function_too_complex(tmp_path: Path) -> None:
    """The gate above can fail: a function of complexity 16 is refused with C901."""
    body = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(16))
    bad = tmp_path / "relay_like.py"
    bad.write_text(f"def f(x: int) -> int:\n{body}    return -1\n")
    out = _run("ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert out.returncode == 1 and "C901" in out.stdout, out.stdout + out.stderr


def test_mypy_strict_is_clean() -> None:
    out = _run("mypy", "--no-incremental")
    assert out.returncode == 0, out.stdout + out.stderr

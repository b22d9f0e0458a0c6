"""The compiled build (setup.py, PBX_RELAY_COMPILE=1) as an operator makes it: a wheel of
a copy of the source tree (the build writes build/ next to setup.py), installed with
--target into a folder to put first on PYTHONPATH. Used by tests/test_compiled.py and
bench/run_sip.py --compiled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


class BuildFailed(RuntimeError):
    """pip could not build or install the wheel; the message ends with its output."""


def build_compiled(src: Path, work: Path, python: str = sys.executable) -> Path:
    """Build the tree ``src`` compiled under ``work``; the folder it is installed in."""
    copy = work / "src"
    shutil.rmtree(copy, ignore_errors=True)
    for name in ("relay", "push", "pbxcore"):
        shutil.copytree(src / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(src / name, copy / name)
    wheels, site = work / "wheels", work / "site"
    env = dict(os.environ, PBX_RELAY_COMPILE="1")
    _pip(python, ["wheel", "-q", "--no-deps", "-w", str(wheels), str(copy)], env)
    (wheel,) = wheels.glob("pbx_relay-*.whl")
    _pip(python, ["install", "-q", "--no-deps", "--target", str(site), str(wheel)], None)
    return site.resolve()


def _pip(python: str, args: list[str], env: dict[str, str] | None) -> None:
    done = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise BuildFailed(f"pip {args[0]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

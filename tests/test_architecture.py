"""The import contract (DESIGN §4, issue 9): layers and forbidden imports, and nobody's private names.

The layers and forbidden imports are import-linter contracts in pyproject.toml
([tool.importlinter]); this test runs them, offline, on every `./dev.sh test`. The
one contract import-linter has no type for — no module imports another package's
private (``_underscore``) names — is checked here on the source.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "push", "pbxcore")


def test_import_contracts_are_kept() -> None:
    # In a process of its own: import-linter sets the root logger to DEBUG.
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_contracts_name_what_issue_9_asks() -> None:
    """The contracts themselves, so that a weakened one shows in review."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    by_name = {c["name"]: c for c in contracts}
    layers = next(c for c in contracts if c["type"] == "layers")
    assert layers["containers"] == ["relay"] and layers["layers"][1:] == ["proxy", "sip"]
    forbidden = {(tuple(c["source_modules"]), tuple(c["forbidden_modules"])) for c in by_name.values()
                 if c["type"] == "forbidden"}
    core = ("relay.proxy", "relay.sip", "relay.media.session", "relay.media.ports", "relay.media.sdp")
    assert forbidden == {(("push",), ("relay",)), (("relay.proxy", "relay.sip"), ("push",)),
                         (("pbxcore",), ("relay", "push")), (core, ("trio",)),
                         (core, ("relay.cluster",))}
    # No exceptions: every contract holds for every import.
    assert [i for c in contracts for i in c.get("ignore_imports", [])] == []


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _private_imports(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("")
    is_package = rel.name == "__init__"
    module = ".".join(rel.parts[:-1] if is_package else rel.parts)
    return _private_imports_in(path.read_text(), module, is_package)


def _private_imports_in(source: str, module: str, is_package: bool = False) -> list[str]:
    own = _package_of(module, is_package)
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            target_pkg = node.module if (ROOT / node.module.replace(".", "/")).is_dir() else \
                node.module.rpartition(".")[0]
            if target_pkg == own or target_pkg.startswith(own + "."):
                continue  # a package's own private names are its business
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            private_module = any(p.startswith("_") and not p.startswith("__") for p in node.module.split("."))
            if names or private_module:
                what = ", ".join(names) or "..."
                bad.append(f"{module} line {node.lineno}: from {node.module} import {what}")
    return bad


def test_no_module_imports_another_packages_private_names() -> None:
    bad = [b for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for b in _private_imports(p)]
    assert bad == []


def test_the_private_name_check_finds_one() -> None:
    """The check above can fail: relay/operator.py used to take push.cli's ``_default_url``."""
    assert _private_imports_in("from push.cli import _default_url, CLI_TOKEN_TTL\n", "relay.operator") == [
        "relay.operator line 1: from push.cli import _default_url"]
    # Within one package, its own private names are fine.
    assert _private_imports_in("from relay.sip.headers import _x\n", "relay.sip.parser") == []

"""The compiled build (setup.py, issue 13 point 5): ``PBX_RELAY_COMPILE=1 pip install .``
turns relay/sip, relay/proxy and the media sessions' pure part into mypyc's C extensions.
Built here from this checkout as an operator would (a wheel, installed into a folder of
the test's), then: the core modules are extensions and the shell is not, the relay says
which core it runs, and the core's own tests and SIPp calls (with RTP too) through a real
relay process pass against it.

What is not run compiled, and why: tests that count Python line events inside relay/sip
(tests/workmeter.py: compiled code has none, so they would pass whatever it did), one
that watches objects go through weak references (compiled classes take none), and the
ones that replace a core function with monkeypatch (a C extension's functions cannot be
replaced). The rest of the suite covers those paths in Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compiledbuild import build_compiled
from tests.realpeers import ROOT, SIPP

# Run again with the core compiled: parsing (RFC 4475's torture messages, the parser's
# properties), the proxy's decisions, transactions and tokens, SDP rewriting and media
# sessions, and real SIPp calls with and without RTP through a relay process.
CORE_TESTS = [
    "tests/test_sip_torture.py",
    "tests/test_sip_parser.py",
    "tests/test_sip_message.py",
    "tests/test_sip_framer.py",
    "tests/test_sip_limits.py",
    "tests/test_sip_properties.py",
    "tests/test_proxy_core.py",
    "tests/test_proxy_transaction.py",
    "tests/test_proxy_media_dialogs.py",
    "tests/test_proxy_push.py",
    "tests/test_flowtoken.py",
    "tests/test_registrar_reflection.py",
    "tests/test_pbx_auth.py",
    "tests/test_authbans.py",
    "tests/test_cluster_core.py",
    "tests/test_sdp.py",
    "tests/test_media_session.py",
    "tests/test_calls_sipp.py",
    # RTP both ways through the anchored SDP (the userspace forwarder; the kernel one
    # differs in the shell only, which is not compiled). One call: the suite's time.
    "tests/test_media_calls.py::test_audio_both_ways_through_the_relay[userspace]",
]
# Not run compiled. Their work budgets are counted in Python line events
# (tests/workmeter.py): none in C. And one that watches objects go with weak references,
# which compiled classes do not take.
NOT_COMPILED = [
    "tests/test_sip_message.py::test_routing_reads_what_the_parser_already_parsed",
    "tests/test_sdp.py::test_anchoring_any_body_stays_within_the_budget",
    "tests/test_sdp.py::test_sipp_offer_is_a_small_part_of_the_budget",
    "tests/test_media_session.py::test_an_ended_or_refused_call_is_freed_by_reference_counting",
]


def _compiled_modules() -> list[str]:
    return [f"relay.{package}.{p.stem}" for package in ("sip", "proxy")
            for p in sorted((ROOT / "relay" / package).glob("*.py")) if p.stem != "__init__"] + [
        "relay.media.ports", "relay.media.sdp", "relay.media.session"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built with PBX_RELAY_COMPILE=1 from a copy of this checkout, installed
    into a folder (tests/compiledbuild.py)."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.fail("the compiled build needs a C compiler (Debian: gcc, python3-dev)")
    return build_compiled(ROOT, tmp_path_factory.mktemp("compiled"))


def _env(site: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(site), RELAY_TEST_COMPILED_SITE=str(site))


def test_the_core_modules_are_c_extensions_and_the_shell_is_not(site: Path) -> None:
    shell = ["relay.service", "relay.transport.flows", "relay.media.forwarder", "push.service"]
    modules = _compiled_modules() + shell
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    print(m, importlib.import_module(m).__file__)\n")
    out = subprocess.run([sys.executable, "-P", "-c", code, *modules], capture_output=True, text=True,
                         env=_env(site), cwd=site, timeout=60)
    assert out.returncode == 0, out.stderr
    where = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    for m in _compiled_modules():
        assert where[m].startswith(str(site)) and where[m].endswith(".so"), (m, where[m])
    for m in shell:
        assert where[m].startswith(str(site)) and where[m].endswith(".py"), (m, where[m])


def test_the_relay_says_which_core_it_runs(site: Path, tmp_path: Path) -> None:
    code = "from relay.service import core_build; print(core_build())"
    compiled = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                              env=_env(site), cwd=tmp_path, timeout=60)
    plain = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path, timeout=60)
    assert (compiled.stdout.strip(), plain.stdout.strip()) == ("compiled", "python"), (
        compiled.stderr, plain.stderr)


def test_the_core_tests_and_sipp_calls_pass_against_the_compiled_core(site: Path) -> None:
    assert SIPP is not None, "sipp not installed (./dev.sh test installs it)"
    # --import-mode=append: the compiled relay on PYTHONPATH comes before the checkout.
    # The conftest checks, with RELAY_TEST_COMPILED_SITE set, that the core it imported is compiled.
    run = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--import-mode=append", "-p", "no:cacheprovider", "-q",
         "-x", *CORE_TESTS, *(f"--deselect={t}" for t in NOT_COMPILED)],
        capture_output=True, text=True, env=_env(site), cwd=ROOT, timeout=900,
    )
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and "compiled core: relay.proxy.core from " + str(site) in run.stdout, tail

"""The compiled build (issue 13, point 5): ``PBX_RELAY_COMPILE=1 pip install .`` compiles
the sans-I/O core with mypyc, the compiler mypy ships, into C extensions that replace those
modules: relay/sip (parser, framer, headers), relay/proxy (routing, transactions, tokens)
and the media sessions' pure part (SDP rewriting, port pool). Everything else (trio,
sockets, forwarders, the push service) stays Python. The code is the same: mypyc compiles
the type-annotated sources as they are (mypy --strict clean). Without the variable, or in
an editable install (``./dev.sh``), nothing is compiled. docs/operations.md, "Compiled
build", has the figures and the why.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
# The sans-I/O core: relay/sip (its __init__ only re-exports), relay/proxy, and the media
# session's pure part (SDP rewriting, port pool, sessions; not the forwarders). Not
# relay/media/effects.py: its dataclasses name session.Leg only under TYPE_CHECKING, and
# compiled they import each other: the import crashes (mypyc 2.4.1).
MEDIA_CORE = ("ports.py", "sdp.py", "session.py")
COMPILED = sorted(
    [str(p.relative_to(HERE)) for p in (HERE / "relay" / "sip").glob("*.py") if p.name != "__init__.py"]
    + [str(p.relative_to(HERE)) for p in (HERE / "relay" / "proxy").glob("*.py")]
    + [f"relay/media/{name}" for name in MEDIA_CORE]
)


def ext_modules() -> list[object]:
    if os.environ.get("PBX_RELAY_COMPILE", "") not in ("1", "yes", "true"):
        return []
    from mypyc.build import mypycify  # build-system requires mypy (pyproject.toml)

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=ext_modules())

"""Count the work a call does inside relay/sip and relay/media/sdp.py, deterministically.

The unit is a Python line event (``sys.settrace``) in code from those files, plus
one per call into them: the same input always costs the same count, whatever the
machine's load, so a test can hold a parser to a work budget without timing it
(speed is measured in bench/run_parse.py). Work done inside C (``str.split``,
``bytes.find``, a compiled regex) is not counted; each such call is one line of
ours, and the code under test never repeats one over the same octets in a loop
(that is what the counted lines would show).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import relay

_RELAY = Path(relay.__file__).resolve().parent
_MEASURED_DIR = str(_RELAY / "sip")
_MEASURED_FILES = frozenset({str(_RELAY / "media" / "sdp.py")})


def _measured(filename: str) -> bool:
    return filename.startswith(_MEASURED_DIR) or filename in _MEASURED_FILES


def work_of(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(what ``fn()`` returned or the exception it raised, line events in measured code)."""
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "call" and _measured(frame.f_code.co_filename):
            count += 1
            return local
        return None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        outcome: Any = fn()
    except Exception as e:  # the caller asserts on what was raised
        outcome = e
    finally:
        sys.settrace(previous)
    return outcome, count

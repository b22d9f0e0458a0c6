"""Cyclic-GC probe for a relay under bench (issue 9): bench only, never in relay/.

Put this directory first on PYTHONPATH and set BENCH_GC_PROBE=<file.json>: every
``pbx-relay ... run`` process started with that environment (this tree's or another
commit's, e.g. the d9440f1 worktree with its own .venv) times each collection by
generation with ``gc.callbacks`` and, at exit, writes one JSON object to the file:

- ``collections``: per generation the count, total / mean / max pause (ms, wall) and
  the objects collected, and mean / max of the collector's own CPU time (``thread_time``:
  what preemption by other processes on a shared machine does not inflate); ``full``:
  every generation-2 collection (s since start, pause ms, CPU ms, objects collected);
- ``census`` (only with BENCH_GC_CENSUS_AT=<s>): the GC-tracked objects by type (top 30),
  the total, and the frozen count, taken once at the end of the first full collection at
  least that many seconds after start — what the next full collection will scan. It
  stops the relay for tens of ms: not in a run whose setup times count.

With BENCH_GC_GARBAGE=1 the collector keeps what it finds unreachable (``DEBUG_SAVEALL``)
and the probe counts it by type after each collection (``garbage``, top 40), then lets
it go: what per-call work leaves for the cyclic collector. That run's pauses include
the counting: use it to find the garbage, not to time.

Other Python processes that inherit the environment (connector, sniffer) are left alone.
Pauses are wall time (``time.perf_counter``) around the collection; the census runs
outside the timed part.

    PYTHONPATH=bench/gcprobe BENCH_GC_PROBE=/tmp/gc.json \\
        .venv/bin/python bench/run_sip.py --out OUT calls --rate 400 --duration 15 --no-direct

(With ``--relay-commit REV`` run_sip.py puts REV's tree before this directory on
PYTHONPATH and starts ``python -m relay.cli``: the probe is still found and used.)
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
from collections import Counter

_OUT = os.environ.get("BENCH_GC_PROBE")
_GARBAGE = os.environ.get("BENCH_GC_GARBAGE") == "1"
_CENSUS_AT = float(os.environ.get("BENCH_GC_CENSUS_AT") or "inf")


def _is_relay() -> bool:
    """``pbx-relay ... run``, or ``python -m relay.cli ... run`` (run_sip.py --relay-commit;
    while site runs, such a process's argv[0] is still "-m")."""
    argv = getattr(sys, "argv", [])
    return bool(argv) and (argv[0].endswith("pbx-relay") or argv[0] == "-m") and "run" in argv


class _Probe:
    def __init__(self, out: str) -> None:
        self.out = out
        self.t_start = time.perf_counter()
        self.t0 = self.c0 = 0.0
        # count, total s, max s, collected, total CPU s, max CPU s
        self.stats = {g: [0, 0.0, 0.0, 0, 0.0, 0.0] for g in (0, 1, 2)}
        self.full: list[tuple[float, float, float, int]] = []
        self.census: dict[str, object] | None = None
        self.garbage: Counter[str] = Counter()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            self.t0, self.c0 = now, cpu
            return
        gen = info["generation"]
        pause, pause_cpu = now - self.t0, cpu - self.c0
        if _GARBAGE:
            self.garbage.update(f"{gen}:{_name(o)}" for o in gc.garbage)
            gc.garbage.clear()
        s = self.stats[gen]
        s[0] += 1
        s[1] += pause
        s[2] = max(s[2], pause)
        s[3] += info.get("collected", 0)
        s[4] += pause_cpu
        s[5] = max(s[5], pause_cpu)
        if gen == 2:
            self.full.append((round(now - self.t_start, 3), round(pause * 1e3, 2), round(pause_cpu * 1e3, 2),
                              info.get("collected", 0)))
            if self.census is None and now - self.t_start >= _CENSUS_AT:
                self.census = self._census()

    @staticmethod
    def _census() -> dict[str, object]:
        objs = gc.get_objects()
        by_type = Counter(_name(o) for o in objs)
        total = len(objs)
        del objs
        return {
            "tracked": total,
            "frozen": gc.get_freeze_count(),
            "top": by_type.most_common(30),
        }

    def write(self) -> None:
        def gen_summary(s: list[float]) -> dict[str, float]:
            n = int(s[0])
            return {
                "count": n,
                "total_ms": round(s[1] * 1e3, 1),
                "mean_ms": round(s[1] * 1e3 / n, 3) if n else 0.0,
                "max_ms": round(s[2] * 1e3, 2),
                "collected": int(s[3]),
                "cpu_mean_ms": round(s[4] * 1e3 / n, 3) if n else 0.0,
                "cpu_max_ms": round(s[5] * 1e3, 2),
            }

        data = {
            "pid": os.getpid(),
            "argv": sys.argv,
            "uptime_s": round(time.perf_counter() - self.t_start, 1),
            "thresholds": gc.get_threshold(),
            "collections": {str(g): gen_summary(s) for g, s in self.stats.items()},
            "full": self.full,
            "census": self.census,
            "garbage": self.garbage.most_common(40) if _GARBAGE else None,
        }
        with open(self.out, "w") as f:
            json.dump(data, f, indent=1)


def _name(o: object) -> str:
    t = type(o)
    if t.__name__ in ("coroutine", "function", "frame", "cell", "method"):
        code = getattr(o, "cr_code", None) or getattr(o, "__code__", None) or getattr(o, "f_code", None)
        if code is not None:
            return f"{t.__name__}:{code.co_qualname}"
    return f"{t.__module__}.{t.__qualname__}"


if _OUT and _is_relay():
    if _GARBAGE:
        gc.set_debug(gc.DEBUG_SAVEALL)
    _probe = _Probe(_OUT)
    gc.callbacks.append(_probe)
    atexit.register(_probe.write)

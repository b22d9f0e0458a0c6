#!/usr/bin/env python3
"""``pbx-relay`` with CPU-time counters around its layers (bench only; relay/ untouched).

Same command line as ``pbx-relay`` (``--config <toml> run``). Wraps, by
monkeypatching at start-up:

- ``parse_message`` as called by the UDP path (relay/transport/flows.py),
- ``StreamFramer.feed`` (TCP/TLS framing + parsing),
- ``Dispatcher.on_message`` (the proxy's decision, serialising, and handing
  the results to the sockets: ``Transports.send``, counted apart as well),

with ``time.thread_time()`` (CLOCK_THREAD_CPUTIME_ID) before and after, and appends
the totals, plus the process's whole CPU time, to $RELAY_TIMED_OUT as one JSON line
on SIGUSR1 and at exit (send SIGUSR1 at the start and the end of a window and diff).
What is not in any counter is the transport layer's own work: trio's run loop, epoll,
recvfrom/recv, the TCP writer tasks, timers.

    RELAY_TIMED_OUT=/tmp/t.json .venv/bin/python bench/relay_timed.py --config relay.toml run

With BENCH_FAST_SPLIT=1 it also applies bench/core_replay.py's --fast-split experiment
(fast paths for split_commas/_split_outside_quotes) to size that hot spot in situ.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

# The relay under test: this tree, or the one run_sip.py --relay-commit unpacked.
sys.path.insert(0, os.environ.get("BENCH_RELAY_SRC") or str(Path(__file__).resolve().parent.parent))

import relay.dispatch as dispatch  # noqa: E402
import relay.transport.flows as flows  # noqa: E402
from relay.cli import main  # noqa: E402

T: dict[str, list[float]] = {}
_clock = time.thread_time
_depth = {"send": 0}


def wrap(name: str, fn):
    T[name] = [0.0, 0]

    def timed(*a, **k):
        t0 = _clock()
        try:
            return fn(*a, **k)
        finally:
            c = T[name]
            c[0] += _clock() - t0
            c[1] += 1

    return timed


if os.environ.get("BENCH_FAST_SPLIT") == "1":
    # The experiment of bench/core_replay.py --fast-split, in the running relay.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from core_replay import fast_split_experiment

    fast_split_experiment()

flows.parse_message = wrap("udp_parse", flows.parse_message)
flows.StreamFramer.feed = wrap("stream_frame_parse", flows.StreamFramer.feed)
dispatch.Dispatcher.on_message = wrap("on_message", dispatch.Dispatcher.on_message)
flows.Transports.send_many = wrap("transports_send", flows.Transports.send_many)


# Cyclic GC pauses (they run inside whichever layer allocated): time per generation.
_gc = {"t0": 0.0}
for _g in (0, 1, 2):
    T[f"gc_gen{_g}"] = [0.0, 0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc["t0"] = _clock()
    else:
        c = T[f"gc_gen{info['generation']}"]
        c[0] += _clock() - _gc["t0"]
        c[1] += 1


gc.callbacks.append(_on_gc)


def snapshot(*_: object) -> None:
    """Append the counters as one JSON line: on SIGUSR1 (window start/end) and at exit."""
    out = os.environ.get("RELAY_TIMED_OUT")
    if not out:
        return
    data: dict[str, object] = {k: {"cpu_s": round(v[0], 6), "calls": v[1]} for k, v in T.items()}
    data["process_cpu_s"] = round(time.process_time(), 6)
    data["main_thread_cpu_s"] = round(time.thread_time(), 6)
    with open(out, "a") as f:
        f.write(json.dumps(data) + "\n")


def memory_report(*_: object) -> None:
    """SIGUSR2 with BENCH_TRACEMALLOC=1: live Python heap by allocation site, as JSON."""
    import tracemalloc

    out = os.environ.get("RELAY_TIMED_OUT")
    if not out or not tracemalloc.is_tracing():
        return
    snap = tracemalloc.take_snapshot()
    stats = snap.statistics("lineno")
    current, peak = tracemalloc.get_traced_memory()
    top = [
        {"site": str(st.traceback[0]), "kib": round(st.size / 1024, 1), "count": st.count}
        for st in stats[:25]
    ]
    by_pkg: dict[str, list[float]] = {}
    for st in snap.statistics("filename"):
        f = st.traceback[0].filename
        key = (
            "relay/" + f.split("/relay/", 1)[1].split("/")[0]
            if "/relay/" in f
            else "trio"
            if "/trio/" in f
            else "ssl.py"
            if f.endswith("/ssl.py")
            else "<attrs generated (trio)>"
            if f.startswith("<attrs")
            else f.rsplit("/", 1)[-1]
        )
        acc = by_pkg.setdefault(key, [0.0, 0])
        acc[0] += st.size / 1024
        acc[1] += st.count
    groups = sorted(
        ({"group": k, "kib": round(v[0], 1), "count": v[1]} for k, v in by_pkg.items()),
        key=lambda x: -x["kib"],
    )[:12]
    # BENCH_TRACEMALLOC_FRAMES=N (N > 1): also the 60 largest sites with their N frames,
    # innermost first (which relay/ line made trio allocate what).
    # and every live block charged to the innermost line of relay/ that led to it.
    tb_stats = snap.statistics("traceback") if tracemalloc.get_traceback_limit() > 1 else []
    stacks = [
        {"kib": round(st.size / 1024, 1), "count": st.count, "frames": [str(f) for f in st.traceback]}
        for st in tb_stats[:60]
    ]
    by_line: dict[str, list[float]] = {}
    for st in tb_stats:
        ours = [f for f in st.traceback if "/relay/" in f.filename]
        key = str(ours[-1]).split("/relay/", 1)[1] if ours else "(no relay/ frame)"
        acc = by_line.setdefault(key, [0.0, 0])
        acc[0] += st.size / 1024
        acc[1] += st.count
    relay_lines = sorted(
        ({"line": k, "kib": round(v[0], 1), "count": v[1]} for k, v in by_line.items()),
        key=lambda x: -x["kib"],
    )[:40]
    with open(out + ".mem", "w") as f:
        f.write(
            json.dumps(
                {
                    "traced_kib": round(current / 1024),
                    "peak_kib": round(peak / 1024),
                    "top": top,
                    "by_group": groups,
                    "stacks": stacks,
                    "relay_lines": relay_lines,
                }
            )
        )


if os.environ.get("BENCH_TRACEMALLOC") == "1":
    import tracemalloc

    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))
    signal.signal(signal.SIGUSR2, memory_report)

signal.signal(signal.SIGUSR1, snapshot)
atexit.register(snapshot)


if __name__ == "__main__":
    sys.exit(main())

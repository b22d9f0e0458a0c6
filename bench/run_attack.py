"""Issue 10, transport attacks: a legitimate client's OPTIONS round trip while one source floods.

    .venv/bin/python bench/run_attack.py all                 # both attacks, ~1.5 minutes
    .venv/bin/python bench/run_attack.py udp --flooders 1     # UDP flood at line rate from one source
    .venv/bin/python bench/run_attack.py connections --count 20500 --sources 4

For each attack: a fresh relay (transport defaults, ``exempt = []`` so that loopback
sources are limited like any other), then three phases of ``--probe`` seconds each:
before, during and after the attack. The probe (tests/transport_attacks.py) sends one
OPTIONS every 20 ms from 127.0.0.30 and records each round trip (1 s without an answer
counts as lost). Per phase: probe p50/p99/max, lost, relay CPU (% of one core) and RSS.
The attacker sends from 127.0.0.2 (.3, .4, .5 for the connection flood). With --pin (the
default on 2+ cores) the relay has the last core to itself and the attacker and probe
share the others. Results: bench/out/attack-<stamp>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HOST,
    PIN,
    PYTHON,
    ROOT,
    CpuMeter,
    Procs,
    machine,
    make_relay,
    pin,
    raise_nofile,
    rss_kib,
    show,
    start_relay,
)

ATTACKERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
CLIENT = "127.0.0.30"


def verb(*args: str) -> list[str]:
    return [PYTHON, "-m", "tests.transport_attacks", *args]


class RssPeak:
    """The relay's largest RSS while a phase runs (sampled every 0.1 s)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_kib(pid), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return round(self.peak / 1024, 1)


def phase(
    procs: Procs, out: Path, relay_pid: int, target: str, name: str, seconds: float,
) -> dict[str, object]:
    """Probe for ``seconds``: round trips, relay CPU and RSS over the same window."""
    cpu, rss = CpuMeter({"relay": relay_pid}), RssPeak(relay_pid)
    cmd = verb("probe", "--target", target, "--source", CLIENT, "--duration", str(seconds))
    p = procs.start(f"probe-{name}", cmd, log=out / f"probe-{name}.log", stdout=out / f"probe-{name}.json",
                    cpus=PIN["load"])
    p.wait(timeout=seconds + 30)
    probe = json.loads((out / f"probe-{name}.json").read_text())
    used = cpu.stop()["relay"]
    return {"probe": probe, "relay_cpu_pct": used["pct_core"], "relay_rss_mb_peak": rss.stop(),
            "relay_rss_mb_end": round(rss_kib(relay_pid) / 1024, 1)}


def attack(args: argparse.Namespace, kind: str, base: Path) -> dict[str, object]:
    out = base / kind
    out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    relay = make_relay(out)
    with open(relay.config, "a") as f:
        f.write("\n[transport]\nexempt = []\n")
    try:
        start_relay(procs, relay, out)
        target = f"{HOST}:{relay.udp}"
        res: dict[str, object] = {"before": phase(procs, out, relay.pid, target, "before", args.probe)}
        if kind == "udp":
            cmds = [verb("udp-flood", "--target", target, "--source", ATTACKERS[0],
                         "--duration", str(args.probe + 2)) for _ in range(args.flooders)]
        else:
            cmds = [verb("tcp-flood", "--target", f"{HOST}:{relay.tcp}", "--sources",
                         ",".join(ATTACKERS[: args.sources]), "--count", str(args.count),
                         "--hold", str(args.probe), "--deadline", "120")]
        floods = [procs.start(f"flood{i}", c, log=out / f"flood{i}.log", stdout=out / f"flood{i}.json",
                              cpus=PIN["load"]) for i, c in enumerate(cmds)]
        time.sleep(1.0)
        res["during"] = phase(procs, out, relay.pid, target, "during", args.probe)
        for p in floods:
            p.wait(timeout=300)
        res["attack"] = [json.loads((out / f"flood{i}.json").read_text()) for i in range(len(floods))]
        res["attack_commands"] = [show(c) for c in cmds]
        time.sleep(2.0)
        res["after"] = phase(procs, out, relay.pid, target, "after", args.probe)
        m = relay.metrics()
        keep = ("refused", "dropped", "accept_failures", "udp_bans", 'requests_in_total{method="OPTIONS"}')
        res["relay_counters"] = {k: v for k, v in m.items() if any(w in k for w in keep)}
        return res
    finally:
        procs.stop_all()


def summary(kind: str, r: dict[str, object]) -> str:
    lines = [f"== {kind}"]
    for ph in ("before", "during", "after"):
        x = r[ph]
        assert isinstance(x, dict)
        p = x["probe"]
        lines.append(f"  {ph:6}  OPTIONS p50 {p['p50_ms']:7} ms  p99 {p['p99_ms']:7} ms  "
                     f"max {p['max_ms']:7} ms  lost {p['lost']}/{p['sent']}  "
                     f"relay CPU {x['relay_cpu_pct']:5}%  "
                     f"RSS peak {x['relay_rss_mb_peak']} MB end {x['relay_rss_mb_end']} MB")
    lines.append(f"  attack: {json.dumps(r['attack'])}")
    lines.append(f"  relay: {json.dumps(r['relay_counters'])}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", "udp", "connections"])
    ap.add_argument("--probe", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--flooders", type=int, default=1, help="UDP flood processes, all from one source")
    ap.add_argument("--count", type=int, default=20_500, help="connections the flood opens")
    ap.add_argument("--sources", type=int, default=4, choices=[1, 2, 3, 4])
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--out", help="output directory (default bench/out/attack-<stamp>)")
    args = ap.parse_args()
    raise_nofile(args.count + 2000)
    cpus = pin(not args.no_pin)
    base = Path(args.out) if args.out else ROOT / "bench" / "out" / time.strftime("attack-%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(ROOT)
    results: dict[str, object] = {"machine": machine(), "cpus": cpus, "load_before": os.getloadavg(),
                                  "command": show([PYTHON, *sys.argv])}
    for kind in (["udp", "connections"] if args.what == "all" else [args.what]):
        results[kind] = attack(args, kind, base)
        print(summary(kind, results[kind]), flush=True)  # type: ignore[arg-type]
    (base / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {base / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

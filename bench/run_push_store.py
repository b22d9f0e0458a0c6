#!/usr/bin/env python3
"""Push wake-ups per second and CPU per wake-up with the SQLite store against the Redis store (issue 13).

    flock /tmp/bench.lock .venv/bin/python bench/run_push_store.py --concurrency 10,50,200 --seconds 5

One client process (pinned to its own core) runs ``PushService.wake()`` — device read,
push, push log row — with K concurrent callers, each waking its own registered device
with a new Call-ID back to back, for ``--seconds`` s after a 1 s warm-up; once over
SQLite (<dir>/push.sqlite, the worker thread as in production), once over Redis (a
redis-server this script starts, ``RedisStore``). Gateways (``--gateways``): ``fcm``,
the real FCM client against the fake of tests/pushfakes.py in another process
(bench/push_fakes_server.py); ``dry-run``, the log gateway (no network), so the store
and the service are all that is measured. CPU: the client's process_time (threads
included) and redis-server's /proc ticks over the same window; other processes on the
machine (the fake, the rest) on the other core. Processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH,
    PIN,
    PYTHON,
    ROOT,
    CpuMeter,
    MachineMeter,
    Procs,
    free_port,
    machine,
    pin,
    wait_quiet,
)
from run_push import start_fake, stats_ms  # noqa: E402
from run_sip import wait_line  # noqa: E402

SERIAL = "0123456789"
KEY = b"B" * 32


def client(argv: list[str]) -> int:
    """The measured process: prints ``window-start``, ``window-end``, ``result <json>``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=("sqlite", "redis"), required=True)
    ap.add_argument("--gateway", choices=("fcm", "dry-run"), required=True)
    ap.add_argument("--info", default="")
    ap.add_argument("--redis-url", default="")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.WARNING)
    res = trio.run(_client_main, a)
    print("result " + json.dumps(res), flush=True)
    return 0


def _service(a: argparse.Namespace) -> Any:
    from push.gateways import FcmGateway
    from push.gateways.log import LogGateway
    from push.redisstore import RedisStore
    from push.service import PushService
    from push.store import SqliteStore

    store: Any = (RedisStore.from_url(a.redis_url, KEY) if a.store == "redis"
                  else SqliteStore(Path(a.dir) / "push.sqlite", KEY))
    if a.gateway == "fcm":
        info = json.loads(Path(a.info).read_text())
        gw: Any = FcmGateway(service_account_file=info["service_account"], base_url=info["base_url"],
                             ca_file=info["ca_file"])
        param = info["project_id"]
    else:
        gw = LogGateway("fcm", device_key=KEY)
        param = "bench-project"
    return PushService(store, {"fcm": gw}, KEY), param


async def _client_main(a: argparse.Namespace) -> dict[str, Any]:
    from pbxcore.wire import DeviceUpdate
    from push.model import PushTarget
    from push.service import WakeRequest

    svc, param = _service(a)
    state = {"counting": False, "stop": False}
    lat: list[float] = []
    outcomes: dict[str, int] = {}

    async def caller(device_id: str, k: int) -> None:
        j = 0
        while not state["stop"]:
            j += 1
            t = trio.current_time()
            r = await svc.wake(WakeRequest(device_id, f"c-{k}-{j}", "100", "201", "203.0.113.7:5060", 30.0,
                                           serial=SERIAL))
            if state["counting"]:
                lat.append(trio.current_time() - t)
                outcomes[str(r.outcome)] = outcomes.get(str(r.outcome), 0) + 1

    async with svc.store.session():
        ids = []
        for k in range(a.concurrency):
            target = PushTarget("fcm", f"bench-{a.store}-{k}:APA91b{k:040d}", param)
            d = await svc.register_device(DeviceUpdate(target, SERIAL, f"u{k}", "198.51.100.7", 5060, "tls"))
            ids.append(d.device_id)
        async with trio.open_nursery() as nursery:
            for k, device_id in enumerate(ids):
                nursery.start_soon(caller, device_id, k)
            await trio.sleep(1.0)
            state["counting"] = True
            c0, w0 = time.process_time(), trio.current_time()
            print("window-start", flush=True)
            await trio.sleep(a.seconds)
            state["counting"] = False
            c1, w1 = time.process_time(), trio.current_time()
            print("window-end", flush=True)
            state["stop"] = True
            nursery.cancel_scope.deadline = trio.current_time() + 15
        counts = await svc.store.counts()
    await svc.aclose()
    wall, done = w1 - w0, sum(outcomes.values())
    return {
        "store": a.store, "gateway": a.gateway, "concurrency": a.concurrency, "seconds": round(wall, 3),
        "pushes": done, "pushes_per_s": round(done / wall, 1), "outcomes": outcomes,
        "latency_ms": stats_ms(lat), "client_cpu_pct": round(100 * (c1 - c0) / wall, 1),
        "client_cpu_per_push_us": round(1e6 * (c1 - c0) / max(1, done), 1),
        "log_rows_in_store": counts["push_log_rows"],
    }


def step(procs: Procs, out: Path, store: str, gateway: str, k: int, seconds: float,
         info: str, redis: subprocess.Popen[bytes], redis_url: str) -> dict[str, Any]:
    quiet = wait_quiet(max_wait=60)
    name = f"client_{store}_{gateway}_{k}"
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, str(BENCH / "run_push_store.py"), "client", "--store", store, "--gateway", gateway,
           "--info", info, "--redis-url", redis_url, "--dir", str(d), "--concurrency", str(k),
           "--seconds", str(seconds)]
    stdout = out / f"{name}.out"
    print(f"-- {store}, {gateway}, K={k}", file=sys.stderr, flush=True)
    p = procs.start(name, cmd, log=out / f"{name}.log", stdout=stdout, cpus=PIN["relay"])
    wait_line(stdout, b"window-start", p, 60, name)
    meter, mm = CpuMeter({"redis": redis.pid}), MachineMeter()
    wait_line(stdout, b"window-end", p, seconds + 60, name)
    redis_cpu, mach = meter.stop()["redis"], mm.stop()
    p.wait(timeout=60)
    line = next((x for x in stdout.read_text().splitlines() if x.startswith("result ")), "")
    if not line:
        raise RuntimeError(f"{name}: no result; {(out / f'{name}.log').read_text()[-2000:]}")
    r: dict[str, Any] = json.loads(line[len("result "):])
    r["redis_cpu_pct"] = redis_cpu["pct_core"] if store == "redis" else 0.0
    r["redis_cpu_per_push_us"] = (round(1e6 * redis_cpu["cpu_s"] / max(1, r["pushes"]), 1)
                                  if store == "redis" else 0.0)
    r["machine_cpu"], r["quiet_wait"] = mach, quiet
    return r


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        return client(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="10,50,200")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--gateways", default="dry-run,fcm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = Path(a.out or BENCH / "out" / f"push-store-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cores = pin(True)
    procs = Procs()
    runs = []
    try:
        port = free_port()
        redis = procs.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(out)], log=out / "redis.log", cpus=PIN["load"])
        time.sleep(0.5)
        gateways = a.gateways.split(",")
        info = ""
        if "fcm" in gateways:
            _, fake = start_fake(procs, out / "fake_fcm", "fcm")
            info = str(Path(fake["dir"]) / "info.json")
        for gateway in gateways:
            for k in (int(x) for x in a.concurrency.split(",")):
                for store in ("sqlite", "redis"):
                    runs.append(step(procs, out, store, gateway, k, a.seconds, info, redis,
                                     f"redis://127.0.0.1:{port}"))
    finally:
        procs.stop_all()
    res = {"machine": machine(), "cores": cores, "command": " ".join(sys.argv), "runs": runs}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print("| gateway | K | store | wake-ups/s | client CPU per wake-up | redis-server CPU per wake-up "
          "| p50 / p99 latency | outcomes |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- | --- |")
    for r in runs:
        lat = r["latency_ms"]
        print(f"| {r['gateway']} | {r['concurrency']} | {r['store']} | {r['pushes_per_s']:,.0f} "
              f"| {r['client_cpu_per_push_us']:,.0f} µs ({r['client_cpu_pct']} %) "
              f"| {r['redis_cpu_per_push_us']:,.0f} µs ({r['redis_cpu_pct']} %) "
              f"| {lat.get('p50', 0)} / {lat.get('p99', 0)} ms | {r['outcomes']} |")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

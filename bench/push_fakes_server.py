#!/usr/bin/env python3
"""tests/pushfakes.py's FakeApns or FakeFcm in a process of its own (bench only).

run_push.py starts one of these per provider so that the fake's CPU (its HTTP/2
server, tests/pushwire.py, the APNs fake's ES256 check of every request) neither shares the GIL
with the client under test nor delays the benchmark's own timestamps.

    python bench/push_fakes_server.py --provider apns --dir OUT/apns [--max-seconds 900]

Writes ``<dir>/info.json`` (base URL, CA file, and the credentials a gateway needs:
the .p8 key, key id and team id for APNs; the service-account file for FCM), then
prints ``ready``. Each answered request is kept as (token, received_mono, status)
only, not the full record (a long run would hold ~100k of them), and the number
of duplicate pushes (a second request for the same token and collapse id, i.e.
the same call on the same phone). SIGUSR1 writes them, with the fake's CPU time
so far, to ``<dir>/requests.json`` (written to a
temporary name, then renamed); SIGTERM/SIGINT stop the fake and exit; so does
``--max-seconds``. ``received_mono`` is time.monotonic(), comparable across
processes of this host.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.pushfakes import FakeApns, FakeFcm, Recorded  # noqa: E402

TOPIC = "com.example.app.voip"


class Compact:
    """Keeps (token, received_mono, status) per request, and counts duplicates: a
    second request for the same device and the same call (token, collapse id) is a
    second push on that phone."""

    def __init__(self) -> None:
        self.compact: list[tuple[str, float, int]] = []
        self.seen: set[tuple[str, str]] = set()
        self.duplicates = 0

    def keep(self, rec: Recorded, collapse: str) -> None:
        self.compact.append((rec.token, rec.received_mono, rec.status))
        key = (rec.token, collapse)
        if key in self.seen:
            self.duplicates += 1
        self.seen.add(key)


class CompactApns(FakeApns):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.kept = Compact()

    def _record(self, rec: Recorded) -> None:
        self.kept.keep(rec, rec.collapse_id or "")


class CompactFcm(FakeFcm):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.kept = Compact()

    def _record(self, rec: Recorded) -> None:
        android = rec.message.get("android")
        self.kept.keep(rec, str(android.get("collapse_key", "")) if isinstance(android, dict) else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", choices=("apns", "fcm"), required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-seconds", type=float, default=900)
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"provider": a.provider, "pid": os.getpid()}
    fake: CompactApns | CompactFcm
    if a.provider == "apns":
        # min_token_interval 0: every gateway made by a benchmark mints its own provider token.
        fake = CompactApns(topics={TOPIC}, min_token_interval=0.0, workdir=d / "fake")
        info.update(
            key_file=str(fake.write_p8(d / "AuthKey.p8")),
            key_id=fake.key_id,
            team_id=fake.team_id,
            topic=TOPIC,
        )
    else:
        fake = CompactFcm(workdir=d / "fake")
        sa = fake.write_service_account(d / "sa.json")
        info.update(service_account=str(sa), project_id=fake.project_id)
    info.update(base_url=fake.base_url, ca_file=str(fake.ca_file))
    flags = {"dump": False, "stop": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("dump", True))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    signal.signal(signal.SIGINT, lambda *_: flags.__setitem__("stop", True))
    fake.start_in_thread()
    (d / "info.json").write_text(json.dumps(info, indent=1))
    print("ready", flush=True)
    deadline = time.monotonic() + a.max_seconds
    try:
        while not flags["stop"] and time.monotonic() < deadline:
            if flags["dump"]:
                flags["dump"] = False
                recs = list(fake.kept.compact)
                t = os.times()
                body = {
                    "requests": recs,
                    "duplicates": fake.kept.duplicates,
                    "auth_requests": len(getattr(fake, "auth_requests", [])),
                    "cpu_s": t.user + t.system,
                }
                tmp = d / "requests.json.tmp"
                tmp.write_text(json.dumps(body))
                tmp.rename(d / "requests.json")
            time.sleep(0.02)
    finally:
        fake.stop(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

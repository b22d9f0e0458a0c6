#!/usr/bin/env python3
"""Many PBXs phoning home over TLS (or, with --plain, TCP) at once: one TLS connection per serial, each does
its digest REGISTER (bench/connector.py's Registrar) and then stays open, idle.

Reads ``{"serial": "secret", ...}`` from ``--secrets``; prints one JSON line when
all are registered (or failed), then holds the connections until SIGINT/SIGTERM or
``--hold`` seconds, and closes them.

    python bench/tls_pbxs.py --relay 127.0.0.1:5061 --secrets secrets.json --domain relay.test
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from connector import Framer, Registrar  # noqa: E402


async def one(
    serial: str,
    secret: str,
    a: argparse.Namespace,
    ctx: ssl.SSLContext,
    gate: trio.Semaphore,
    done: dict[str, int],
    hold: trio.Event,
    lat: list[float],
) -> None:
    async with gate:
        t0 = time.monotonic()
        try:
            with trio.fail_after(30):
                if a.plain:
                    stream = tcp = await trio.open_tcp_stream(a.host, a.port)
                else:
                    stream = await trio.open_ssl_over_tcp_stream(a.host, a.port, ssl_context=ctx)
                    await stream.do_handshake()
                    tcp = stream.transport_stream
                local = tcp.socket.getsockname()[:2]
                reg = Registrar(serial, secret, a.domain, a.algorithm, local, a.expires)
                await stream.send_all(reg.request())
                framer = Framer()
                while not reg.registered:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectionError("closed")
                    for msg in framer.feed(data):
                        if msg.startswith(b"SIP/2.0 "):
                            nxt = reg.on_response(msg)
                            if nxt:
                                await stream.send_all(nxt)
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            ssl.SSLError,
            ConnectionError,
            SystemExit,
        ) as e:
            done["failed"] += 1
            if done["failed"] <= 5:
                print(f"tls_pbxs: {serial}: {type(e).__name__} {e}", file=sys.stderr)
            return
        lat.append(time.monotonic() - t0)
        done["ok"] += 1
    try:
        # Idle, as a registered PBX is; drain whatever the relay might send.
        with trio.move_on_after(a.hold):
            async with trio.open_nursery() as n:

                async def drain() -> None:
                    framer = Framer()
                    while data := await stream.receive_some(65536):
                        if not a.answer:
                            continue
                        for msg in framer.feed(data):
                            reply = answer(msg, serial, local, "tcp" if a.plain else "tls")
                            if reply:
                                await stream.send_all(reply)

                n.start_soon(drain)
                await hold.wait()
                n.cancel_scope.cancel()
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id"}


def answer(msg: bytes, serial: str, local: tuple[str, int], transport: str) -> bytes | None:
    """``--answer``: what a PBX says to a request the relay forwards (INVITE → 200 with a
    Contact and the Record-Route echoed, BYE/OPTIONS/CANCEL → 200, ACK and responses → nothing)."""
    if msg.startswith(b"SIP/2.0 ") or msg.startswith(b"ACK "):
        return None
    lines = msg.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    out = ["SIP/2.0 200 OK"]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = _COMPACT.get(name.strip().lower(), name.strip().lower())
        value = value.strip()
        if key == "to" and method == "INVITE" and ";tag=" not in value:
            value += f";tag=p{serial}"
        if key in ("via", "from", "to", "call-id", "cseq") or (key == "record-route" and method == "INVITE"):
            out.append(f"{key.title()}: {value}")
    if method == "INVITE":
        out.append(f"Contact: <sip:{serial}@{local[0]}:{local[1]};transport={transport}>")
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode()


async def amain(a: argparse.Namespace) -> None:
    secrets = json.loads(Path(a.secrets).read_text())
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    gate = trio.Semaphore(a.concurrency)
    done = {"ok": 0, "failed": 0}
    hold = trio.Event()
    lat: list[float] = []
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for serial, secret in secrets.items():
            nursery.start_soon(one, serial, secret, a, ctx, gate, done, hold, lat)

        async def report() -> None:
            while done["ok"] + done["failed"] < len(secrets):
                await trio.sleep(0.05)
            lat.sort()
            print(
                json.dumps(
                    {
                        "registered": done["ok"],
                        "failed": done["failed"],
                        "seconds": round(time.monotonic() - t0, 2),
                        "connect_register_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
                        "pid": os.getpid(),
                    }
                ),
                flush=True,
            )

        nursery.start_soon(report)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            with trio.move_on_after(a.hold):
                async for _ in signals:
                    break
        hold.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relay", required=True, help="relay TLS ip:port (TCP with --plain)")
    ap.add_argument("--plain", action="store_true", help="plain TCP instead of TLS (for comparison)")
    ap.add_argument("--secrets", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--algorithm", default="SHA-256")
    ap.add_argument("--expires", type=int, default=3600)
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes+REGISTERs in flight")
    ap.add_argument("--answer", action="store_true",
                    help="answer what the relay forwards (INVITE/BYE/OPTIONS → 200)")
    ap.add_argument("--hold", type=float, default=120.0, help="keep connections open at most this long")
    a = ap.parse_args()
    a.host, _, port = a.relay.rpartition(":")
    a.port = int(port)
    trio.run(amain, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

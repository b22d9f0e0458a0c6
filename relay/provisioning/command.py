"""The ``pbx-relay link`` command line: the agent a PBX vendor runs next to the PBX."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from relay.pbx.directory import valid_serial
from relay.provisioning.agent import AgentSettings, run_agent
from relay.provisioning.policy import KeepaliveTimes

SECRET_ENV = "PBX_LINK_SECRET"  # not PBX_RELAY_*: those are the relay's own configuration keys
DEFAULT_PORT = 4433


def add_link_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``link`` to the pbx-relay command's subcommands."""
    p = sub.add_parser(
        "link", help="keep a PBX's provisioning link to the relay (runs next to the PBX)",
        description="Open the provisioning link to the relay and forward the phones' requests "
                    "to the PBX's local provisioning URL (docs/provisioning.md). The secret is the "
                    f"one `pbx-relay pbx add` printed: from --secret-file or ${SECRET_ENV}.")
    p.add_argument("--relay", required=True, help=f"relay host[:port] (port {DEFAULT_PORT} by default)")
    p.add_argument("--serial", required=True, help="the PBX's serial")
    p.add_argument("--target", required=True,
                   help="the PBX's provisioning base URL, e.g. http://127.0.0.1:8080/provisioning")
    p.add_argument("--secret-file", help=f"file holding the PBX's secret (else ${SECRET_ENV})")
    p.add_argument("--ca", help="the relay's certificate or CA bundle (PEM); default: the system's CAs")
    p.add_argument("--server-name", help="name to check the relay's certificate for (default: the host)")
    p.add_argument("--target-ca", help="CA bundle for an https --target")
    p.add_argument("--keepalive", type=float, default=20.0, help="seconds of silence before a PING (20)")
    p.add_argument("--keepalive-timeout", type=float, default=10.0,
                   help="seconds a PING may go unanswered before the link is dead (10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(fn=cmd_link)


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """AgentSettings from the command line; ValueError with a one-line reason."""
    if not valid_serial(args.serial):
        raise ValueError(f"invalid serial {args.serial!r}")
    if args.secret_file:
        secret = Path(args.secret_file).read_text().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise ValueError(f"no secret: give --secret-file or set ${SECRET_ENV}")
    host, sep, port = args.relay.rpartition(":")
    if not sep or "]" in port:
        host, port = args.relay, str(DEFAULT_PORT)
    if not port.isdigit():
        raise ValueError(f"--relay {args.relay!r}: bad port")
    if not 0 < args.keepalive_timeout < 3600 or not 0 < args.keepalive < 3600:
        raise ValueError("--keepalive and --keepalive-timeout: seconds between 0 and 3600")
    return AgentSettings(
        relay_host=host.strip("[]"), relay_port=int(port), serial=args.serial, secret=secret,
        target=args.target, ca_file=args.ca, server_name=args.server_name, target_ca=args.target_ca,
        keepalive=KeepaliveTimes(args.keepalive, args.keepalive_timeout),
    )


def cmd_link(args: argparse.Namespace) -> int:
    """Run the agent until Ctrl-C or SIGTERM."""
    from pbxcore.journal import configure_logging

    try:
        settings = settings_from_args(args)
    except (ValueError, OSError) as e:
        print(f"pbx-relay link: {e}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    try:
        trio.run(_until_signal, settings)
    except KeyboardInterrupt:
        pass
    return 0


async def _until_signal(settings: AgentSettings) -> None:
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent, settings)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return

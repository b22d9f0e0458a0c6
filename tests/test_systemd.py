"""The systemd units as written: checked by systemd-analyze, and run by their own ExecStart lines.

No systemd runs the services here (PID 1 of a test container is not systemd), so the test
plays its part: it builds a fake filesystem root holding the installed layout, runs each
unit's ExecStart line with the environment systemd would give it (``NOTIFY_SOCKET`` bound
by the test, ``WATCHDOG_USEC``, the ``EnvironmentFile``), sends the signals systemctl would
send, and reads the notifications the service sends back.

What the test substitutes, and nothing else: every absolute path under the install prefix
(``/opt/pbx-relay``), the configuration directories (``/etc/pbx-relay``, ``/etc/pbx-push``),
the state directories (``/var/lib/...``) and ``/bin/kill`` gets the fake root in front;
``$RUNTIME_DIRECTORY`` is a directory of the test's, and ``$MAINPID`` the service's pid.
In the fake root, ``opt/pbx-relay/bin/pbx-relay`` and ``pbx-push`` exec this virtualenv's
entry points (same pid: the service stays systemd's main process), and the configs name
free loopback ports. ``systemd-analyze verify --root`` checks the units against that root,
so the ExecStart binaries it insists on exist there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from pbxcore.sdnotify import Notifier, keep_watchdog
from relay import config as relay_config
from relay.transport.tlscert import ensure_self_signed
from tests.media_peers import MediaEndpoint, PbxUa, Phone, establish, hang_up
from tests.realpeers import DOMAIN, RelayProc, free_port
from tests.sipclient import SERIAL, Msg, parse, rand, request

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
PREFIX = "/opt/pbx-relay"
SUBSTITUTED = (PREFIX + "/", "/etc/pbx-relay/", "/etc/pbx-push/", "/var/lib/", "/bin/kill")
WATCHDOG_USEC = 2_000_000  # the test's WatchdogSec: 2 s, so a ping every second
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_tools = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze missing (Debian package systemd; ./dev.sh test installs it)")


# ------------------------------------------------------------------ the units
def unit(name: str) -> dict[str, list[str]]:
    """``[Service]``/``[Unit]``/``[Install]`` keys of a unit file → their values, in order."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def one(name: str, key: str) -> str:
    values = unit(name)[key]
    assert len(values) == 1, (name, key, values)
    return values[0]


def rooted(root: Path, path: str) -> str:
    if path.startswith(SUBSTITUTED) or path + "/" in SUBSTITUTED:
        return str(root) + path
    return path


def exec_line(root: Path, name: str, key: str = "ExecStart") -> list[str]:
    """The unit's command line with the fake root in front of the documented paths."""
    return [rooted(root, arg) for arg in shlex.split(one(name, key))]


def fake_root(tmp: Path) -> Path:
    """The installed layout under ``tmp/root``: unit files, the programs the units name,
    the config and state directories, and systemd's own units (for ``verify --root``)."""
    root = tmp / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    system_units = Path("/usr/lib/systemd/system")
    if system_units.is_dir():
        shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    venv_bin = Path(sys.executable).parent
    for name in ("pbx-relay.service", "pbx-push.service"):
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
        for key in ("ExecStart", "ExecReload"):
            program = shlex.split(one(name, key))[0]
            shim = Path(rooted(root, program))
            shim.parent.mkdir(parents=True, exist_ok=True)
            target = venv_bin / shim.name if program.startswith(PREFIX) else Path(program)
            if program.startswith(PREFIX) and not target.exists():  # no entry point: run the module
                module = {"pbx-relay": "relay.cli", "pbx-push": "push.cli"}[shim.name]
                shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
            else:
                shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
            shim.chmod(0o755)
        for key in ("StateDirectory", "ConfigurationDirectory"):
            base = "/var/lib/" if key == "StateDirectory" else "/etc/"
            where = Path(rooted(root, base + one(name, key)))
            assert where.is_relative_to(root), where  # never the host's own /etc
            where.mkdir(parents=True, exist_ok=True)
    return root


# ------------------------------------------------------------- the notify socket
class NotifySocket:
    """The AF_UNIX datagram socket systemd would listen on: every notification, parsed."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)  # a previous run's
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait(self, key: str, value: str | None = None, *, after: int = 0, timeout: float = 10.0) -> int:
        """Index of the first message from ``after`` on that sets ``key`` (to ``value``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    fields = self.messages[i][1]
                    if key in fields and value in (None, fields[key]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value or '*'} after #{after}: {self.messages}")
                self._cond.wait(left)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.messages[i][1]

    def count(self, key: str, after: int = 0) -> int:
        with self._cond:
            return sum(1 for _, f in self.messages[after:] if key in f)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Service:
    """A unit's ExecStart running with systemd's environment."""

    name: str
    proc: subprocess.Popen[bytes]
    notify: NotifySocket
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # what systemd gives ExecStart and ExecReload
    lines: list[str] = field(default_factory=list)  # stdout (the banner)
    pump: threading.Thread | None = None  # reads stdout until the service exits

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.pump is not None:
            self.pump.join(timeout=5)
        self.notify.close()


def env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line
                and not line.startswith("#"))


def start(root: Path, tmp: Path, name: str, *, ready: bool = True) -> Service:
    """Run ``name``'s ExecStart as systemd would: its EnvironmentFile, WorkingDirectory,
    RUNTIME_DIRECTORY, NOTIFY_SOCKET and WATCHDOG_USEC; wait for READY=1 unless ``ready``
    is False."""
    sock = NotifySocket(tmp / f"{name}.notify")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PBX_RELAY_", "PBX_PUSH_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM"))}
    env.update(PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(sock.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    env.update(env_file(Path(rooted(root, one(name, "EnvironmentFile").lstrip("-")))))
    runtime = tmp / "run" / one(name, "RuntimeDirectory")
    shutil.rmtree(runtime, ignore_errors=True)  # systemd makes it anew at each start
    runtime.mkdir(parents=True)
    env["RUNTIME_DIRECTORY"] = str(runtime)
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(exec_line(root, name), cwd=rooted(root, one(name, "WorkingDirectory")),
                                env=env, stdout=subprocess.PIPE, stderr=log)
    svc = Service(name, proc, sock, log_path, env)
    assert proc.stdout is not None
    out = proc.stdout

    def pump() -> None:
        with out:
            for line in out:
                svc.lines.append(line.decode(errors="replace"))

    svc.pump = threading.Thread(target=pump, daemon=True)
    svc.pump.start()
    if ready:
        try:
            sock.wait("READY", "1", timeout=15)
        except AssertionError:
            svc.stop()
            raise AssertionError(f"{name}: no READY=1\n{svc.log()[-3000:]}") from None
    return svc


def reload_unit(root: Path, svc: Service) -> subprocess.CompletedProcess[str]:
    """``systemctl reload``: the unit's ExecReload with ``$MAINPID``, in the service's
    environment. systemctl returns when this returns."""
    argv = [str(svc.proc.pid) if a == "$MAINPID" else a for a in exec_line(root, svc.name, "ExecReload")]
    return subprocess.run(argv, env=svc.env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.stop()


# ------------------------------------------------------------------ configs
def media_ports() -> tuple[int, int]:
    lo = random.randrange(20000, 60000, 2)
    return lo, lo + 200


@dataclass
class RelaySetup:
    root: Path
    relay: RelayProc  # ports and secrets, for the SIP peers in tests/media_peers.py
    config: Path
    cert: Path
    key: Path


def write_push_config(root: Path) -> tuple[Path, int]:
    api, admin = free_port(), free_port()
    conf = root / "etc/pbx-push/push.toml"
    conf.write_text(f'[push]\nstate_dir = "{root}/var/lib/pbx-push"\nlog_level = "info"\n'
                    f'[api]\nlisten = "127.0.0.1:{api}"\ntoken_ttl_max = 31536000\n'
                    f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    return conf, api


def write_relay_config(root: Path, push: str, drain: float, tls: bool = True) -> RelaySetup:
    state = root / "var/lib/pbx-relay"
    r = RelayProc(state, "127.0.0.1", free_port(), free_port(), free_port(), free_port())
    etc = root / "etc/pbx-relay"
    cert, key = etc / "tls/fullchain.pem", etc / "tls/privkey.pem"
    lo, hi = media_ports()
    conf = etc / "relay.toml"
    conf.write_text(f"""
[relay]
domain = "{DOMAIN}"
advertise = "127.0.0.1"
state_dir = "{state}"
drain_timeout = {drain}

[sip]
udp = ["127.0.0.1:{r.udp}"]
tcp = ["127.0.0.1:{r.tcp}"]
tls = ["127.0.0.1:{r.tls}"]
{f'tls_cert = "{cert}"' if tls else ""}
{f'tls_key = "{key}"' if tls else ""}
digest_algorithms = ["MD5", "SHA-256"]

[media]
port_min = {lo}
port_max = {hi}

[admin]
listen = "127.0.0.1:{r.admin}"

[push]
{push}
""")
    r.config_path = conf
    r.log_path = root.parent / "pbx-relay.service.log"
    return RelaySetup(root, r, conf, cert, key)


def new_cert(tmp: Path, name: str, dest_cert: Path, dest_key: Path) -> str:
    """A fresh self-signed pair copied to where the config points; its SHA-256 fingerprint."""
    cert, key = ensure_self_signed(tmp / name, DOMAIN, ["127.0.0.1"])
    dest_cert.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(cert, dest_cert)
    shutil.copy(key, dest_key)
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def served_cert(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def eventually(fn: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def cli(
    root: Path, program: str, *args: str, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The operator's command: systemd/bin/<program> (the wrapper installed as
    /usr/local/sbin/<program>) with the same path substitutions; run as root here, the
    wrapper's runuser switches to root instead of the service user."""
    text = (UNITS / "bin" / program).read_text()
    for path in ("/opt/pbx-relay/", "/etc/pbx-relay/", "/etc/pbx-push/"):
        text = text.replace(path, str(root) + path)
    user = "pbx-relay" if program == "pbx-relay" else "pbx-push"
    if os.geteuid() == 0:
        text = text.replace(f"runuser -u {user} --", "runuser -u root --")
    else:
        text = text.replace(f"runuser -u {user} -- ", "")
    wrapper = root / "usr/local/sbin" / program
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(text)
    wrapper.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PBX_RELAY_", "PBX_PUSH_"))}
    return subprocess.run([str(wrapper), *args], capture_output=True, text=True, timeout=30,
                          env=dict(base, PYTHONPATH=str(ROOT), **(env or {})))


# ============================================================== static checks
@needs_systemd_tools
def test_units_pass_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    """``verify --root`` loads the units as systemd would (unknown keys, bad values,
    missing binaries all fail); ``security`` keeps the sandbox from eroding."""
    root = fake_root(tmp_path)
    assert SYSTEMD_ANALYZE is not None
    units = ["pbx-relay.service", "pbx-push.service"]
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", *units],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    for u in units:
        out = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", f"--root={root}",
                              "--threshold=20", u], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
        assert exposure is not None and float(exposure.group(1)) <= 2.0, out.stdout[-300:]
    # The drop-in for ports below 1024 loads too, and grants exactly that capability.
    dropin = root / "etc/systemd/system/pbx-relay.service.d"
    dropin.mkdir()
    shutil.copy(UNITS / "bind-low-ports.conf", dropin / "bind-low-ports.conf")
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", units[0]],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    # So does the drop-in for the kernel media backend (with nft where it names it).
    shutil.copy(UNITS / "kernel-media.conf", dropin / "kernel-media.conf")
    nft = root / "usr/sbin/nft"  # under the fake root, never the host's own nft
    assert nft.is_relative_to(root), nft
    nft.parent.mkdir(parents=True, exist_ok=True)
    nft.write_text("#!/bin/sh\nexit 0\n")
    nft.chmod(0o755)
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", units[0]],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    sysusers = shutil.which("systemd-sysusers")
    if sysusers:
        (root / "etc/sysusers.d").mkdir()
        shutil.copy(UNITS / "pbx-relay.sysusers", root / "etc/sysusers.d/pbx-relay.conf")
        out = subprocess.run([sysusers, f"--root={root}", "--dry-run"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert "Creating user 'pbx-relay'" in out.stderr + out.stdout
        assert "Creating user 'pbx-push'" in out.stderr + out.stdout


def test_kernel_media_dropin_grants_net_admin_bpf_and_netlink_only() -> None:
    """The capabilities, address family and system call libnftables and the eBPF
    fast lane need, nothing more; and a killed relay's table is removed when the
    service stops (its tc program goes with the process)."""
    text = (UNITS / "kernel-media.conf").read_text()
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert lines == ["[Service]", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF",
                     "AmbientCapabilities=CAP_NET_ADMIN CAP_BPF",
                     "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK", "SystemCallFilter=bpf",
                     "ExecStopPost=-/usr/sbin/nft delete table inet pbx_relay"]
    sysctl = (UNITS / "kernel-media.sysctl").read_text()
    assert [x for x in sysctl.splitlines() if x and not x.startswith("#")] == ["net.ipv4.ip_forward = 1"]


def test_units_say_what_the_services_need() -> None:
    for name, user in (("pbx-relay.service", "pbx-relay"), ("pbx-push.service", "pbx-push")):
        u = unit(name)
        want = {
            "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
            "ExecReload": "/opt/pbx-relay/bin/python3 -I -m pbxcore.reloadack $MAINPID",
            "LimitNOFILE": "65536", "User": user, "RuntimeDirectory": user,
            "StateDirectory": user, "ConfigurationDirectory": user, "NoNewPrivileges": "yes",
            "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
            "AmbientCapabilities": "",
        }
        for key, value in want.items():
            assert one(name, key) == value, (name, key)
        assert "@system-service" in u["SystemCallFilter"]
        argv = shlex.split(one(name, "ExecStart"))
        assert argv[0].startswith(PREFIX + "/bin/") and argv[-1] == "run"
        assert argv[argv.index("--config") + 1].startswith(f"/etc/{user}/")
    # Stopping waits for the drain: systemd must not kill the relay in the middle of it.
    drain = relay_config.RelaySection().drain_timeout
    assert float(one("pbx-relay.service", "TimeoutStopSec")) > drain + 10
    # The production configs shipped next to the units fit them and check out.
    prod = relay_config.load(UNITS / "relay.toml", environ={"PBX_RELAY_PUSH_TOKEN": "t"})
    assert prod.relay.state_dir == "/var/lib/" + one("pbx-relay.service", "StateDirectory")
    assert prod.relay.drain_timeout + 10 < float(one("pbx-relay.service", "TimeoutStopSec"))
    assert prod.push.mode == "remote" and prod.push.token == "t"
    from push import config as push_config

    pcfg = push_config.load(UNITS / "push.toml", environ={})
    assert str(pcfg.state_dir) == "/var/lib/" + one("pbx-push.service", "StateDirectory")
    assert pcfg.api_listen.port == int(prod.push.url.rsplit(":", 1)[1])


# ====================================================================== runs
def test_bad_config_stops_with_one_line_naming_the_key_and_the_file(
    tmp_path: Path, services: list[Service],
) -> None:
    root = fake_root(tmp_path)
    for name, conf, key in (("pbx-relay.service", "etc/pbx-relay/relay.toml", "relay.colour"),
                            ("pbx-push.service", "etc/pbx-push/push.toml", "push.colour")):
        path = root / conf
        path.write_text(f'[{key.split(".")[0]}]\ncolour = "blue"\n')
        svc = start(root, tmp_path, name, ready=False)
        services.append(svc)
        assert svc.wait_exit(15) == 2
        err = svc.log()
        prog = name.removesuffix(".service")
        assert err == f"{prog}: {path}: unknown key {key}\n", err
        assert svc.notify.messages == []  # never READY


def test_push_unit_notifies_reloads_credentials_and_stops(tmp_path: Path, services: list[Service]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    root = fake_root(tmp_path)
    conf, api = write_push_config(root)
    svc = start(root, tmp_path, "pbx-push.service")
    services.append(svc)
    ready = svc.notify.wait("READY", "1")
    assert svc.notify[ready]["STATUS"] == "Serving: 0 devices, 0 push log rows; APNs dry-run, FCM dry-run"
    # Pings come closer together than WatchdogSec, or systemd would restart the service.
    dog = svc.notify.wait("WATCHDOG", "1", after=ready, timeout=WATCHDOG_USEC / 1e6)
    again = svc.notify.wait("WATCHDOG", "1", after=dog + 1, timeout=WATCHDOG_USEC / 1e6)
    assert svc.notify.messages[again][0] - svc.notify.messages[dog][0] < WATCHDOG_USEC / 1e6

    # SIGHUP with FCM credentials and another log level: re-read, applied, said so.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    sa = root / "etc/pbx-push/firebase-sa.json"
    sa.write_text(json.dumps({"type": "service_account", "project_id": "p", "client_email": "x@p.iam",
                              "private_key": pem, "token_uri": "http://127.0.0.1:9/token"}))
    conf.write_text(conf.read_text().replace('log_level = "info"', 'log_level = "debug"')
                    + f'[fcm]\nservice_account = "{sa}"\n')
    done = reload_unit(root, svc)
    assert (done.returncode, done.stderr) == (0, "")
    # Applied when `systemctl reload` returns: the line is there without waiting for it.
    assert "event=reloaded" in svc.log()
    i = svc.notify.wait("RELOADING", "1", after=ready)
    assert int(svc.notify[i]["MONOTONIC_USEC"]) > 0
    j = svc.notify.wait("READY", "1", after=i)
    assert "FCM live" in svc.notify[j]["STATUS"]
    line = next(x for x in svc.log().splitlines() if "event=reloaded" in x)
    assert "log_level=debug(changed)" in line and "gateways=apns:dry-run,fcm:live" in line, line
    assert "restart_needed=-" in line

    # A broken key file keeps the gateways that work; a listen address is named for restart.
    sa.write_text("{not json")
    conf.write_text(conf.read_text().replace(f"127.0.0.1:{api}", f"127.0.0.1:{free_port()}"))
    svc.signal(signal.SIGHUP)
    k = svc.notify.wait("READY", "1", after=svc.notify.wait("RELOADING", "1", after=j))
    assert "FCM live" in svc.notify[k]["STATUS"]
    eventually(lambda: svc.log().count("event=reloaded") == 2, what="second reloaded line")
    log = svc.log()
    assert "event=reload_failed what=gateways" in log and "restart_needed=api.listen" in log
    assert svc.proc.poll() is None

    svc.signal(signal.SIGTERM)
    assert svc.wait_exit(10) == 0
    assert svc.notify.wait("STOPPING", "1", after=k) > k
    assert "Traceback" not in svc.log()


def _invite(phone_sock: socket.socket, relay: RelayProc) -> Msg:
    """A new call from a phone over UDP; the first final answer."""
    local = phone_sock.getsockname()
    data = request("INVITE", f"sip:100@{SERIAL}.{DOMAIN}", local=local, call_id=rand(),
                   from_=f"<sip:202@{SERIAL}.{DOMAIN}>", extra=[f"Contact: <sip:202@{local[0]}:{local[1]}>"])
    phone_sock.sendto(data, ("127.0.0.1", relay.udp))
    phone_sock.settimeout(5)
    while True:
        m = parse(phone_sock.recv(70_000))
        if (m.status or 0) >= 200:
            return m


def test_relay_unit_ready_reload_and_drain(tmp_path: Path, services: list[Service]) -> None:
    root = fake_root(tmp_path)
    push_conf, api = write_push_config(root)
    push = start(root, tmp_path, "pbx-push.service")
    services.append(push)
    # The operator's way: mint the relay's token, put it in the relay's secrets.env.
    token = cli(root, "pbx-push", "token", "--scope", "relay", "--ttl", "31536000")
    assert token.returncode == 0, token.stderr
    setup = write_relay_config(root, f'mode = "remote"\nurl = "http://127.0.0.1:{api}"', drain=20.0)
    (root / "etc/pbx-relay/secrets.env").write_text(f"PBX_RELAY_PUSH_TOKEN={token.stdout.strip()}\n")
    first = new_cert(tmp_path, "cert-a", setup.cert, setup.key)
    r = setup.relay

    svc = start(root, tmp_path, "pbx-relay.service")
    services.append(svc)
    ready = svc.notify.wait("READY", "1")
    # READY=1 came after every listener was bound: they all answer now.
    socket.create_connection(("127.0.0.1", r.tcp), timeout=2).close()
    assert served_cert(r.tls) == first
    assert http_get(r.admin, "/healthz") == (200, "ok\n")
    assert svc.notify[ready]["STATUS"] == (
        "Serving: 0 PBXs registered, 0 TCP/TLS flows, 0 calls, 0 INVITEs pending, "
        "media (userspace): 0 streams in the kernel, 0 in userspace")
    svc.notify.wait("WATCHDOG", "1", after=ready, timeout=WATCHDOG_USEC / 1e6)
    eventually(lambda: http_get(r.admin, "/readyz") == (200, "ready\n"),
               what="/readyz 200 (the remote push service answers)")

    # A PBX added by the operator's command, and a renewed certificate: one SIGHUP.
    added = cli(root, "pbx-relay", "pbx", "add", SERIAL)
    assert added.returncode == 0, added.stderr  # the wrapper gave it the token from secrets.env
    r.secrets[SERIAL] = next(x.split()[1] for x in added.stdout.splitlines() if x.startswith("secret"))
    second = new_cert(tmp_path, "cert-b", setup.cert, setup.key)
    done = reload_unit(root, svc)
    assert (done.returncode, done.stderr) == (0, "")
    # Applied when `systemctl reload` returns (a renewal hook relies on it): no waiting here.
    assert served_cert(r.tls) == second
    pbx = PbxUa(r)  # registers at once, without waiting for the directory's 2 s poll
    i = svc.notify.wait("RELOADING", "1", after=ready)
    j = svc.notify.wait("READY", "1", after=i)
    line = next(x for x in svc.log().splitlines() if "event=reloaded" in x)
    # `pbx add` already made the running relay read the directory (POST /v1/directory/reload);
    # the reload reads it again and finds the PBX there.
    assert "tls=new" in line and f"tls_sha256={second[:16]}" in line and "pbx_count=1" in line, line
    assert "event=directory_loaded pbx_count=1 added=1" in svc.log()
    # The push service's verbs need an operator token (the relay's may not list devices):
    # the wrapper mints one with the pbx-push wrapper beside it, no $PBX_RELAY_OPERATOR_TOKEN.
    for verb in (["devices"], ["pbx", "show", SERIAL], ["export", SERIAL, "201"]):
        out = cli(root, "pbx-relay", *verb)
        assert (out.returncode, out.stderr) == (0, ""), verb
    assert "devices     0" in cli(root, "pbx-relay", "pbx", "show", SERIAL).stdout

    # A certificate that does not load: logged, the old one stays, the relay runs on.
    setup.cert.write_text("not a certificate\n")
    svc.signal(signal.SIGHUP)
    k = svc.notify.wait("READY", "1", after=svc.notify.wait("RELOADING", "1", after=j))
    assert served_cert(r.tls) == second
    assert "event=reload_failed what=tls" in svc.log() and svc.proc.poll() is None

    # A call in progress when systemctl stops the relay: it drains.
    phone, a, b = Phone(r), MediaEndpoint(), MediaEndpoint()
    call = establish(phone, pbx, a, b)
    svc.signal(signal.SIGTERM)
    stop = svc.notify.wait("STOPPING", "1", after=k)
    assert svc.notify[stop]["STATUS"] == "Draining"
    eventually(lambda: http_get(r.admin, "/readyz") == (503, "draining\n"), what="/readyz 503")
    with pytest.raises(ConnectionRefusedError):  # no new TCP connections ...
        socket.create_connection(("127.0.0.1", r.tcp), timeout=2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # ... nor new calls
        s.bind(("127.0.0.1", 0))
        refused = _invite(s, r)
    assert refused.status == 503, refused.raw
    assert 1 <= int(refused.get("retry-after") or 0) <= 20
    time.sleep(0.5)
    assert svc.proc.poll() is None, "the relay did not wait for the call"
    hang_up(call)  # BYE and 200 still cross the relay
    t0 = time.monotonic()
    assert svc.wait_exit(5) == 0
    print(f"relay exited {time.monotonic() - t0:.2f} s after the call ended")
    log = svc.log()
    assert "event=draining calls=1 invites=0 limit=20" in log and "event=drained" in log, log[-2000:]
    assert "Traceback" not in log
    for x in (phone, a, b):
        x.close()
    pbx.close()


def test_relay_drain_limit_second_signal_and_ctrl_c(tmp_path: Path, services: list[Service]) -> None:
    root = fake_root(tmp_path)
    setup = write_relay_config(root, 'mode = "off"', drain=1.5, tls=False)
    r = setup.relay
    added = cli(root, "pbx-relay", "pbx", "add", SERIAL)
    assert added.returncode == 0, added.stderr
    r.secrets[SERIAL] = next(x.split()[1] for x in added.stdout.splitlines() if x.startswith("secret"))

    def with_a_call() -> tuple[Service, list[object]]:
        svc = start(root, tmp_path, "pbx-relay.service")
        services.append(svc)
        pbx, phone, a, b = PbxUa(r), Phone(r), MediaEndpoint(), MediaEndpoint()
        establish(phone, pbx, a, b)
        return svc, [pbx, phone, a, b]

    # The call never ends: the relay gives up on it after relay.drain_timeout, exit 0.
    svc, peers = with_a_call()
    t0 = time.monotonic()
    svc.signal(signal.SIGTERM)
    assert svc.wait_exit(10) == 0
    took = time.monotonic() - t0
    assert took >= 1.4, took  # it waited for the drain limit (1.5 s) before giving up
    assert "event=drain_timeout calls=1 invites=0 limit=1.5" in svc.log()
    for p in peers:
        p.close()  # type: ignore[attr-defined]

    # A second SIGTERM cuts the drain short; so does Ctrl-C (SIGINT), without draining at all.
    for second in (signal.SIGTERM, None):
        setup = write_relay_config(root, 'mode = "off"', drain=30.0, tls=False)
        r.udp, r.tcp, r.tls, r.admin = setup.relay.udp, setup.relay.tcp, setup.relay.tls, setup.relay.admin
        svc, peers = with_a_call()
        t0 = time.monotonic()
        svc.signal(signal.SIGTERM if second else signal.SIGINT)
        if second:
            svc.notify.wait("STOPPING", "1")
            time.sleep(0.3)
            assert svc.proc.poll() is None
            svc.signal(second)
        assert svc.wait_exit(5) == 0
        assert time.monotonic() - t0 < 5.0  # not the 30 s drain
        assert svc.notify.count("STOPPING") == 1
        assert ("drain=cut_short" in svc.log()) == bool(second)
        for p in peers:
            p.close()  # type: ignore[attr-defined]


# ============================================================ sd_notify itself
def test_notifier_is_a_no_op_without_systemd_and_honours_watchdog_pid() -> None:
    quiet = Notifier.from_environ({})
    assert not quiet.enabled and quiet.ready("x") is False and quiet.watchdog_interval is None
    n = Notifier.from_environ({"NOTIFY_SOCKET": "@pbx-test", "WATCHDOG_USEC": "30000000"}, pid=42)
    assert n.address == "\0pbx-test" and n.watchdog_interval == 15.0
    other = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
                                  pid=42)
    assert other.watchdog_interval is None  # the watchdog is another process's
    mine = Notifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"},
                                 pid=42)
    assert mine.watchdog_interval == 15.0


def test_notifier_speaks_to_an_abstract_socket_and_keeps_status_on_one_line() -> None:
    name = f"pbx-relay-test-{os.getpid()}-{rand(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("two\nlines")
        assert s.recv(4096) == b"READY=1\nSTATUS=two lines"
        assert n.reloading()
        assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", s.recv(4096))
        n.close()


async def test_watchdog_pings_only_while_the_check_passes(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    n = Notifier(str(path), watchdog_usec=100_000)  # a ping every 50 ms
    healthy = True

    async def check() -> str | None:
        return None if healthy else "stuck"

    async def pings(seconds: float) -> int:
        got = 0
        with trio.move_on_after(seconds):
            while True:
                assert await sock.recv(64) == b"WATCHDOG=1"
                got += 1
        return got

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_watchdog, n, check)
        assert await pings(0.3) >= 3
        healthy = False
        await trio.sleep(0.06)  # a ping may be on its way: let it arrive, then drop it
        while True:
            with trio.move_on_after(0.02) as quiet:
                await sock.recv(64)
            if quiet.cancelled_caught:
                break
        assert await pings(0.3) == 0
        healthy = True
        assert await pings(0.2) >= 2
        nursery.cancel_scope.cancel()
    sock.close()
    n.close()


def test_logs_carry_syslog_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """Under systemd stderr is the journal ($JOURNAL_STREAM names it): "<4>" makes a
    warning a warning for `journalctl -p`, and journald stamps the time itself."""
    code = ("import logging; from pbxcore.journal import configure_logging; configure_logging('info');"
            "logging.getLogger('relay').warning('event=x'); logging.getLogger('relay').debug('event=y')")
    out = tmp_path / "stderr"
    for journal in (True, False):
        with open(out, "wb") as f:
            st = os.fstat(f.fileno())
            env = dict(os.environ, PYTHONPATH=str(ROOT),
                       JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}" if journal else "1:1")
            subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=30)
        text = out.read_text()
        if journal:
            assert text == "<4>WARNING relay event=x\n"
        else:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING relay event=x\n", text), text

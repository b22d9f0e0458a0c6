"""systemd/fail2ban's filter matches the lines the relay writes when it bans (fail2ban-regex)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.proxy.authbans import MAX_FAILURES
from tests.proxyharness import make_proxy
from tests.test_authbans import GUESSER, guess

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "systemd/fail2ban/filter.d/pbx-relay.conf"


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None,
                    reason="fail2ban not installed (./dev.sh test installs it)")
def test_the_filter_finds_the_banned_sources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proxy, _ = make_proxy()
    caplog.set_level(logging.INFO)
    for _ in range(MAX_FAILURES):
        guess(proxy, GUESSER, 1.0)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")  # the relay's journal format
    lines = [fmt.format(r) for r in caplog.records]
    assert any("event=auth_banned" in line for line in lines)
    prefix = lines[-1].split(" event=")[0]
    lines.append(f"{prefix} event=udp_source_banned source=198.51.100.77 seconds=30 (over 4x its budget)")
    lines.append(f"{prefix} event=registered serial=0123456789 source=192.0.2.1")
    log = tmp_path / "relay.log"
    log.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["fail2ban-regex", "--print-all-matched", str(log), str(FILTER)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = f"Lines: {len(lines)} lines, 0 ignored, 2 matched, {len(lines) - 2} missed"
    assert summary in out.stdout, out.stdout
    matched = out.stdout.split("Lines:")[-1]
    assert f"source={GUESSER.remote_ip}" in matched and "source=198.51.100.77" in matched

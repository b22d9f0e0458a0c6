"""Inside the booted container, what a shell line cannot do: a PBX phoning home, a renewed certificate.

Run there as ``/opt/pbx-relay/bin/python3 inside.py VERB ...`` with
``PYTHONPATH=/usr/local/src/pbx-relay`` (the checkout that README step 1 cloned), so it
uses the installed packages and the repository's own SIP test peer (tests/sipclient.py).

    pbx-online SERIAL SECRET         register over TCP (MD5 digest), print "registered",
                                     hold the connection until stdin closes
    renew LINEAGE HOOK               a new certificate in LINEAGE, run HOOK (the README's
                                     deploy hook) and, the moment it returns, check that
                                     new TLS connections to 127.0.0.1:5061 get it
    fcm-account PATH                 a service-account file of the form FCM takes (its own
                                     new key, token_uri on a closed loopback port)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.transport.tlscert import ensure_self_signed
from tests.realpeers import DOMAIN, RelayProc
from tests.sipclient import Pbx

SIP_TLS = ("127.0.0.1", 5061)  # systemd/relay.toml's sip.tls
SIP_TCP = 5060
REGISTER_TRIES = 10  # 0.5 s apart: past the relay's 2 s directory poll


def pbx_online(serial: str, secret: str) -> int:
    relay = RelayProc(Path("/var/lib/pbx-relay"), "127.0.0.1", SIP_TCP, SIP_TCP, SIP_TLS[1], 9090)
    relay.secrets[serial] = secret
    # A PBX that registers the moment `pbx add` returns may meet a relay that has not
    # re-read its directory yet (2 s poll, issue 14 point 1): a real PBX would retry, so
    # does this one, and says so.
    for attempt in range(1, REGISTER_TRIES + 1):
        try:
            pbx = Pbx(relay, serial)  # raises unless the REGISTER got 200
            break
        except AssertionError as e:
            if attempt == REGISTER_TRIES or b" 403 " not in str(e).encode():
                raise
            time.sleep(0.5)
    print(f"registered (attempt {attempt})", flush=True)
    sys.stdin.read()
    pbx.stream.close()
    return 0


def fingerprint(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def served() -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(SIP_TLS, timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def renew(lineage: str, hook: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = ensure_self_signed(Path(tmp), DOMAIN, ["203.0.113.10"])
        Path(lineage).mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, Path(lineage) / "fullchain.pem")
        shutil.copy(key, Path(lineage) / "privkey.pem")
    want = fingerprint((Path(lineage) / "fullchain.pem").read_text())
    before = served()
    done = subprocess.run([hook], env=dict(os.environ, RENEWED_LINEAGE=lineage))
    now = served()  # at once: no sleep, no retry — the hook's `systemctl reload` returned
    print(f"renew: hook exit {done.returncode}; served before {before[:16]}, "
          f"right after the hook {now[:16]}, new certificate {want[:16]}")
    return 0 if done.returncode == 0 and now == want != before else 1


def fcm_account(path: str) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    Path(path).write_text(json.dumps({
        "type": "service_account", "project_id": "install-test", "client_email": "relay@install-test.iam",
        "private_key": pem, "token_uri": "http://127.0.0.1:9/token"}))
    return 0


def main(argv: list[str]) -> int:
    verbs = {"pbx-online": (pbx_online, 2), "renew": (renew, 2), "fcm-account": (fcm_account, 1)}
    if not argv or argv[0] not in verbs or len(argv) - 1 != verbs[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    fn, _ = verbs[argv[0]]
    return int(fn(*argv[1:]))  # type: ignore[operator]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

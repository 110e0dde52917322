"""uwsgi over TLS: the private CA the servers' certificates come from, and what a server's TLS side negotiates and
whether it resumes sessions."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from pathlib import Path

from . import REPO
from .nginx import request


def make_certs(tmp: Path) -> Path:
    """A private CA and a server certificate for localhost and 127.0.0.1 (deploy/make-certs, EC P-256), in tmp/tls."""
    certs = tmp / "tls"
    p = subprocess.run(
        [str(REPO / "deploy" / "make-certs"), "--dir", str(certs), "DNS:localhost,IP:127.0.0.1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if p.returncode != 0:
        raise RuntimeError(f"deploy/make-certs failed: {(p.stdout + p.stderr).strip()}")
    return certs


def uwsgi_packet(path: str) -> bytes:
    """A uwsgi request for GET `path`, with the vars nginx sends."""
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "REQUEST_URI": path, "QUERY_STRING": "",
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "1"}  # fmt: skip
    data = b"".join(
        len(k).to_bytes(2, "little") + k.encode() + len(v).to_bytes(2, "little") + v.encode() for k, v in env.items()
    )
    return bytes([0]) + len(data).to_bytes(2, "little") + bytes([0]) + data


def tls_resumption(port: int, certs: Path, hello: bytes, tries: int = 8) -> str:
    """Connects `tries` + 1 times to 127.0.0.1:`port` as nginx does (verifying the certificate for localhost, a
    request for /hello per connection, whose answer must end with `hello`), each time offering the last session;
    says the protocol, cipher and how many were resumed.
    A server that resumes nothing makes every request of the TLS scenario a full handshake."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    session, resumed, seen = None, 0, ""
    try:
        for i in range(tries + 1):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                    seen = f"{tls.version()}, {tls.cipher()[0]}"  # before the close, which forgets them
                    if i and tls.session_reused:
                        resumed += 1
                    tls.sendall(uwsgi_packet("/hello"))
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
                    if not answer.endswith(hello):
                        return f"wrong answer over TLS: {answer[:60]!r}"
                    # Read after the answer: a TLS 1.3 ticket arrives after the handshake.
                    session = tls.session
    except (OSError, ssl.SSLError) as e:
        return f"TLS check failed: {e}"
    return f"{seen}, {resumed}/{tries} sessions resumed by a fresh client"


def ferrule_handshakes(port: int, path: str) -> str | None:
    """ferrule's TLS handshake counters so far (its --metrics, which nginx serves at `path`), e.g. "120 full,
    80,000 resumed"."""
    try:
        status, _, body = request(port, path, timeout=10)
    except OSError:
        return None
    kinds = dict(re.findall(rb'^ferrule_tls_handshakes_total\{kind="(\w+)"\} (\d+)', body, re.MULTILINE))
    if status != 200 or not kinds:
        return None
    full, resumed = int(kinds.get(b"full", 0)), int(kinds.get(b"resumed", 0))
    return f"{full:,} full and {resumed:,} resumed ({100 * resumed / max(full + resumed, 1):.1f}%)"

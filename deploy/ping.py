#!/usr/bin/env python3
"""Health probe for ferrule: sends a uWSGI ping and exits 0 only on ferrule's exact answer.

Used by the Dockerfile HEALTHCHECK, the compose health checks and the Kubernetes exec probes,
because ferrule speaks only the uwsgi protocol: an HTTP probe cannot talk to it directly.

The ping is the 4-byte uwsgi header `64 00 00 00` (modifier1 100, datasize 0, modifier2 0);
ferrule answers `64 00 00 01` and closes. Anything else, a refused or reset connection, or no
answer within the timeout, is a failure. It needs nothing but the Python standard library.

Usage:
    ping.py [ADDRESS] [--timeout SECS]

ADDRESS is `unix:/path`, `/abs/path`, `HOST:PORT` or `[V6]:PORT`, as for `ferrule --socket`
(default unix:/run/ferrule/app.sock). Exit status: 0 healthy, 1 unhealthy, 2 bad usage.
"""

import argparse
import socket
import sys
import time

PING = bytes([100, 0, 0, 0])
PONG = bytes([100, 0, 0, 1])
DEFAULT_ADDRESS = "unix:/run/ferrule/app.sock"
# Well under the probes' own timeouts (Docker 5 s, Kubernetes 1-5 s), so this script reports first.
DEFAULT_TIMEOUT = 3.0


def parse_address(text):
    """Returns (family, sockaddr) for a --socket style address."""
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[len("unix:") :]
    if text.startswith("/"):
        return socket.AF_UNIX, text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [V6]:PORT, got {text!r}")
        return socket.AF_INET6, (host, int(port))
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected unix:/path, /path or HOST:PORT, got {text!r}")
    return socket.AF_INET, (host, int(port))


def ping(address, timeout):
    """Returns None when ferrule answered correctly, else a one-line reason."""
    family, sockaddr = parse_address(address)
    deadline = time.monotonic() + timeout
    if family != socket.AF_UNIX:
        # Resolve the name (e.g. a compose service) to whichever family it has.
        infos = socket.getaddrinfo(sockaddr[0], sockaddr[1], type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        sock.sendall(PING)
        # Read to EOF: ferrule closes after the answer, so a server that keeps the connection open
        # or sends more than the 4 bytes is not the answer we want.
        answer = b""
        while len(answer) <= len(PONG):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"no complete answer within {timeout:g}s (got {answer.hex(' ') or 'nothing'})"
            sock.settimeout(remaining)
            chunk = sock.recv(64)
            if not chunk:
                break
            answer += chunk
    if answer != PONG:
        return f"unexpected answer {answer.hex(' ') or '(none)'}, expected {PONG.hex(' ')}"
    return None


def main(argv):
    parser = argparse.ArgumentParser(description="uWSGI ping probe for ferrule")
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (default 3)")
    args = parser.parse_args(argv)
    try:
        reason = ping(args.address, args.timeout)
    except ValueError as e:
        print(f"ping.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        reason = f"{type(e).__name__}: {e}"
    if reason is not None:
        print(f"ferrule at {args.address} is unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

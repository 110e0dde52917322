"""Helpers shared by the CI scripts in .ci/: progress lines, failing with one clear message, running commands,
bounded waits, and small HTTP and port utilities for the tests that go through a real nginx."""

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def note(msg: str) -> None:
    print(f"    {msg}", flush=True)


class Failure(Exception):
    """A check failed; the message names what (the cell, the step) and shows what was seen."""


def fail(msg: str):
    raise Failure(msg)


def run(cmd, what: str = "", **kw) -> subprocess.CompletedProcess:
    """Runs a command and fails, naming it (and `what` it was for), if it exits non-zero. No command here is
    expected to run for long without output, but a `timeout` may be given to bound it."""
    printable = " ".join(str(c) for c in cmd)
    try:
        done = subprocess.run([str(c) for c in cmd], **kw)
    except subprocess.TimeoutExpired as e:
        fail(f"{what + ': ' if what else ''}{printable} did not finish within {e.timeout}s")
    if done.returncode != 0:
        output = ""
        if kw.get("capture_output"):
            output = f"\n{done.stdout}{done.stderr}"
        fail(f"{what + ': ' if what else ''}{printable} exited with {done.returncode}{output}")
    return done


def main_guard(main) -> None:
    """Runs `main`, turning a Failure into one line on stderr and exit status 1. SIGTERM (and SIGINT, which a
    background job ignores) become an exception, so `finally` blocks still unmount and kill what they made."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        main()
    except Failure as e:
        print(f"{Path(sys.argv[0]).name}: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def wait_for(what: str, done, timeout: float, context=lambda: "") -> None:
    """Polls `done()` until it is true; after `timeout` seconds fails with `what` and `context()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.05)
    fail(f"{what} within {timeout:.0f}s\n{context()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout: float) -> tuple:
    """(status, body) of a GET through nginx; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Timer:
    """Wall-clock time of named parts, printed as a table at the end of a script."""

    def __init__(self):
        self.parts = []

    def part(self, name: str):
        timer = self

        class _Part:
            def __enter__(self):
                self.start = time.monotonic()

            def __exit__(self, *exc):
                timer.parts.append((name, time.monotonic() - self.start, exc[0] is None))

        return _Part()

    def report(self) -> None:
        step("time per part")
        for name, seconds, ok in self.parts:
            note(f"{seconds:7.1f}s  {name}{'' if ok else '  (failed)'}")

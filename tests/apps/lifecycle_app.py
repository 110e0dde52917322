"""WSGI app for ferrule's process-lifecycle tests (tests/it/lifecycle.rs): which process answered, slow and stuck
requests, memory growth, and a version read at import time so a reload can be seen (stdlib only)."""

import json
import os
import threading
import time
from urllib.parse import parse_qs

# Bounds every wait in this app, so a server that never cuts a request off fails the test instead of hanging CI.
STUCK_LIMIT_S = 20.0

# A reload must import the code afresh: the tests write `lifecycle_version.py` into a directory on
# --pythonpath, change it, send SIGHUP and expect the new value. Without that module the version is "none".
try:
    import lifecycle_version

    VERSION = str(lifecycle_version.VERSION)
except ImportError:
    VERSION = "none"

# Memory kept by /grow, so the worker's resident set stays up until it is replaced.
_KEPT = []
_KEPT_LOCK = threading.Lock()

TEXT = [("Content-Type", "text/plain")]


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _mark(environ, text):
    """A line in the server log (wsgi.errors goes there), so a test can wait for the app to reach a point."""
    environ["wsgi.errors"].write(f"lifecycle-marker {text}\n")
    environ["wsgi.errors"].flush()


def _text(start_response, body):
    start_response("200 OK", list(TEXT))
    return [body.encode()]


def pid(environ, start_response):
    return _text(start_response, str(os.getpid()))


def sleep(environ, start_response):
    q = _query(environ)
    seconds = min(float(q.get("s", "1")), STUCK_LIMIT_S)
    tag = q.get("tag", "-")
    _mark(environ, f"sleep-start tag={tag} pid={os.getpid()}")
    time.sleep(seconds)
    _mark(environ, f"sleep-end tag={tag} pid={os.getpid()}")
    return _text(start_response, str(os.getpid()))


def lifecycle_stuck_in_here(environ):
    """Sleeps in short steps so the stack dump taken by --timeout shows this function by name. Says when it has
    been stuck for a second, so a test can start a neighbour request that overlaps the timeout."""
    started = time.monotonic()
    marked = False
    while time.monotonic() < started + STUCK_LIMIT_S:
        time.sleep(0.05)
        if not marked and time.monotonic() >= started + 1.0:
            _mark(environ, f"stuck-1s pid={os.getpid()}")
            marked = True


def stuck(environ, start_response):
    _mark(environ, f"stuck-start pid={os.getpid()}")
    lifecycle_stuck_in_here(environ)
    return _text(start_response, "the server never cut this request off")


def grow(environ, start_response):
    mb = int(_query(environ).get("mb", "8"))
    # bytes * n writes every byte, so the pages are resident (a calloc'd buffer would not count in RSS).
    block = b"\x01" * (mb << 20)
    with _KEPT_LOCK:
        _KEPT.append(block)
        kept = sum(len(b) for b in _KEPT) >> 20
    start_response("200 OK", list(TEXT) + [("X-Kept-MiB", str(kept))])
    return [str(os.getpid()).encode()]


def flags(environ, start_response):
    body = json.dumps(
        {
            "multiprocess": environ["wsgi.multiprocess"],
            "multithread": environ["wsgi.multithread"],
            "run_once": environ["wsgi.run_once"],
            "pid": os.getpid(),
        }
    )
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]


def version(environ, start_response):
    return _text(start_response, f"{VERSION} {os.getpid()}")


ROUTES = {
    "/pid": pid,
    "/sleep": sleep,
    "/stuck": stuck,
    "/grow": grow,
    "/flags": flags,
    "/version": version,
}


def application(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        start_response("404 Not Found", list(TEXT))
        return [b"no such route"]
    return route(environ, start_response)

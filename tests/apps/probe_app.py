"""WSGI app that many of ferrule's tier-3 tests run (tests/it/harness/server.rs): one route per thing a test looks
at. The environ as the app sees it, a stuck view, bare bytes returned instead of an iterable, deep recursion,
wsgi.errors writes, and memory growth (stdlib only).

A request with `?tag=` writes `probe called tag=<tag>` to wsgi.errors, so a test can tell from the
server's log whether the app ran at all.
"""

import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs

TEXT = [("Content-Type", "text/plain")]

# Memory kept by /grow, so the worker's resident set stays up.
_KEPT = []
_KEPT_LOCK = threading.Lock()


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _text(start_response, body, status="200 OK"):
    start_response(status, list(TEXT))
    return [body.encode()]


def pid(environ, start_response):
    return _text(start_response, str(os.getpid()))


def python(environ, start_response):
    """Which Python runs the app: version, prefix and executable."""
    out = {
        "version": "%d.%d.%d" % sys.version_info[:3],
        "prefix": sys.prefix,
        "executable": sys.executable,
        "path": sys.path,
        "virtual_env": os.environ.get("VIRTUAL_ENV"),
    }
    try:
        import venv_marker  # present only in the venv a test names with --virtualenv

        out["marker"] = venv_marker.VALUE
    except ImportError:
        out["marker"] = None
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(out).encode()]


def env(environ, start_response):
    """The CGI part of the environ (str values), the wsgi.* flags, the body read in full, and the pid."""
    out = {k: v for k, v in environ.items() if k.isupper() and isinstance(v, str)}
    out["wsgi.multiprocess"] = environ["wsgi.multiprocess"]
    out["wsgi.multithread"] = environ["wsgi.multithread"]
    out["body"] = environ["wsgi.input"].read().decode("latin-1")
    out["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(out).encode()]


def stuck_view_marker():
    """Sleeps far past any --timeout a test sets, so the stack dump shows this function by name."""
    time.sleep(30)


def stuck(environ, start_response):
    stuck_view_marker()
    return _text(start_response, "the server never cut this request off")


def bare(environ, start_response):
    """Returns a bare bytes-like object (or str) instead of an iterable of bytes, as a beginner's app does."""
    q = _query(environ)
    kind = q.get("kind", "bytes")
    status = q.get("status", "200")
    reason = {"200": "OK", "204": "No Content", "304": "Not Modified"}.get(status, "Whatever")
    headers = list(TEXT)
    if "cl" in q:
        headers.append(("Content-Length", q["cl"]))
    start_response(f"{status} {reason}", headers)
    if kind == "bytearray":
        return bytearray(b"hello")
    if kind == "str":
        return "hello"
    return b"hello"


def _depth(n):
    # Each level goes through C (sum and map) back into Python, so it uses C stack as well as Python frames.
    return 0 if n == 0 else sum(map(_depth, [n - 1])) + 1


def recurse(environ, start_response):
    """`?n=DEPTH[&limit=L]`: recursion DEPTH levels deep through map(); with `limit` the recursion limit is
    raised for this request and restored afterwards."""
    q = _query(environ)
    n = int(q.get("n", "10"))
    old = sys.getrecursionlimit()
    if "limit" in q:
        sys.setrecursionlimit(int(q["limit"]))
    try:
        result = _depth(n)
    finally:
        sys.setrecursionlimit(old)
    return _text(start_response, str(result))


def errors(environ, start_response):
    """Writes to wsgi.errors in the shape `?case=` names, with `?tag=` in every piece."""
    q = _query(environ)
    tag = q.get("tag", "x")
    stream = environ["wsgi.errors"]
    case = q.get("case", "multi")
    if case == "multi":
        stream.write(f"{tag}-line1\n{tag}-line2\n{tag}-line3\n")
    elif case == "partial":
        stream.write(f"{tag}-part1 ")
        stream.write(f"{tag}-part2\n")
    elif case == "tail":
        stream.write(f"{tag}-tail-without-newline")
    return _text(start_response, "written")


def grow(environ, start_response):
    mb = int(_query(environ).get("mb", "8"))
    # bytes * n writes every byte, so the pages are resident (a calloc'd buffer would not count in RSS).
    block = b"\x01" * (mb << 20)
    with _KEPT_LOCK:
        _KEPT.append(block)
    return _text(start_response, str(os.getpid()))


ROUTES = {
    "/pid": pid,
    "/python": python,
    "/env": env,
    "/stuck": stuck,
    "/bare": bare,
    "/recurse": recurse,
    "/errors": errors,
    "/grow": grow,
}


def application(environ, start_response):
    tag = _query(environ).get("tag")
    if tag is not None:
        environ["wsgi.errors"].write(f"probe called tag={tag}\n")
    route = ROUTES.get(environ.get("PATH_INFO", ""), env)
    return route(environ, start_response)

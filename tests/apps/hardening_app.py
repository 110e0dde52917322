"""WSGI app for ferrule's hardening tests (tests/it/hardening.rs) and soak run (benches/soak): bodies read in
small pieces, long streams whose close() is recorded, app faults, and header injection attempts (stdlib only).

Events are appended to the file named by $HARDENING_EVENT_LOG, one per line: `called <tag>` when a request with
`?tag=` reaches the app, `close <tag>` when the server calls close() on a response iterable. So a test can see
that the app never ran for a refused request, and that close() was called even when the client had gone away.
"""

import hashlib
import os
from urllib.parse import parse_qs

TEXT = [("Content-Type", "text/plain")]
# Read size for request bodies: small, so the app never holds a whole upload and the memory test measures the
# server, not the app.
READ_CHUNK = 64 * 1024


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _record(event):
    path = os.environ.get("HARDENING_EVENT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event}\n")


def ok(environ, start_response):
    start_response("200 OK", list(TEXT))
    return [b"ok"]


def pid(environ, start_response):
    start_response("200 OK", list(TEXT))
    return [str(os.getpid()).encode()]


def upload(environ, start_response):
    """Reads the whole body in 64 KiB pieces; answers `<length> <sha256>`."""
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    total = 0
    while True:
        piece = stream.read(READ_CHUNK)
        if not piece:
            break
        digest.update(piece)
        total += len(piece)
    start_response("200 OK", list(TEXT))
    return [f"{total} {digest.hexdigest()}".encode()]


class Stream:
    """`chunks` pieces of `size` bytes; close() is recorded, so a test can see the server called it."""

    def __init__(self, tag, chunks, size):
        self.tag = tag
        self.left = chunks
        self.piece = b"x" * size

    def __iter__(self):
        return self

    def __next__(self):
        if self.left <= 0:
            raise StopIteration
        self.left -= 1
        return self.piece

    def close(self):
        _record(f"close {self.tag}")


def stream(environ, start_response):
    q = _query(environ)
    chunks = min(int(q.get("chunks", "16")), 100_000)
    size = min(int(q.get("size", "65536")), 1 << 20)
    start_response("200 OK", list(TEXT))
    return Stream(q.get("tag", "-"), chunks, size)


def raise_before(environ, start_response):
    raise ValueError(f"hardening-before {_query(environ).get('tag', '-')}")


def raise_midway(environ, start_response):
    tag = _query(environ).get("tag", "-")
    start_response("200 OK", list(TEXT))

    def body():
        yield b"first chunk\n"
        raise RuntimeError(f"hardening-midway {tag}")

    return body()


class CloseRaises:
    def __init__(self, tag):
        self.tag = tag

    def __iter__(self):
        return iter([b"body before a failing close\n"])

    def close(self):
        _record(f"close {self.tag}")
        raise KeyError(f"hardening-close {self.tag}")


def close_raises(environ, start_response):
    start_response("200 OK", list(TEXT))
    return CloseRaises(_query(environ).get("tag", "-"))


INJECT = {"cr": "\r", "lf": "\n", "crlf": "\r\n", "nul": "\0"}


def inject(environ, start_response):
    """start_response with CR, LF or NUL smuggled into the status, a header name or a header value."""
    q = _query(environ)
    bad = INJECT[q.get("c", "crlf")]
    smuggled = f"{bad}X-Injected: yes{bad}"
    where = q.get("where", "value")
    status, headers = "200 OK", list(TEXT)
    if where == "status":
        status = "200 OK" + smuggled
    elif where == "name":
        headers.append(("X-Name" + smuggled, "v"))
    else:
        headers.append(("X-Value", "v" + smuggled))
    start_response(status, headers)
    return [b"the app's body\n"]


def status(environ, start_response):
    code = _query(environ).get("code", "404")
    start_response(f"{code} Whatever", list(TEXT))
    return [f"status {code}\n".encode()]


ROUTES = {
    "/ok": ok,
    "/pid": pid,
    "/upload": upload,
    "/stream": stream,
    "/raise_before": raise_before,
    "/raise_midway": raise_midway,
    "/close_raises": close_raises,
    "/inject": inject,
    "/status": status,
}


def application(environ, start_response):
    tag = _query(environ).get("tag")
    if tag:
        _record(f"called {tag}")
    # Any other path (the captured fixtures' /search, /submit, ...) is an ordinary 200.
    return ROUTES.get(environ.get("PATH_INFO", ""), ok)(environ, start_response)

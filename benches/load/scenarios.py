"""The load benchmark's scenarios: one request each, driven by wrk against every server in turn."""

from __future__ import annotations

from dataclasses import dataclass

FILE_SIZE = 50_000_000
POST_SIZE = 1 << 20
# The file scenario measures bandwidth: a few connections saturate it, more only queue.
FILE_CONNECTIONS = 4


@dataclass
class Scenario:
    name: str
    path: str
    description: str
    # Whether nginx can answer the same bytes itself (the ceiling row).
    ceiling: bool = False
    method: str = "GET"
    connections: int | None = None  # None: the --connections setting
    wrk_timeout: int = 10
    # uwsgi over TLS (nginx's suwsgi://) to the servers' TLS instances, instead of a Unix socket.
    tls: bool = False
    # Request headers wrk and the answer check send.
    headers: tuple[tuple[str, str], ...] = ()


# Servers with no uwsgi-over-TLS to measure, and why; the report says so under the TLS scenario.
NO_TLS = {
    "gunicorn": "its uwsgi protocol has no TLS",
    "granian": "it speaks HTTP, not uwsgi",
}

# The framework views answer a JSON document built from the path, this header and the query.
VIEW_QUERY = "page=2&sort=title"
VIEW_HEADERS = (("X-Bench-Client", "wrk"),)

# The scenarios of this run: bench.py's --scenarios narrows the list in place.
SCENARIOS = [
    # Small and in-memory first, the memory-heavy ones last, so a server that keeps memory after a big body
    # does not carry it into the small scenarios' RSS figures.
    Scenario("hello", "/hello", "GET, 11-byte body", ceiling=True),
    Scenario(
        "tls-hello",
        "/hello",
        "GET, 11-byte body, uwsgi over TLS 1.3 on 127.0.0.1 (suwsgi://, sessions resumed)",
        tls=True,
    ),
    Scenario("bytes64k", "/bytes64k", "GET, 64 KiB body from memory", ceiling=True),
    Scenario("stream", "/stream", "GET, generator of 16 x 4 KiB chunks, no Content-Length"),
    Scenario(
        "flask",
        f"/flask/json?{VIEW_QUERY}",
        "GET, small Flask JSON view (the path, a header and the query as JSON)",
        headers=VIEW_HEADERS,
    ),
    Scenario(
        "django",
        f"/django/json?{VIEW_QUERY}",
        "GET, small Django JsonResponse view (the path, a header and the query) through session, CSRF, common, "
        "auth and messages middleware, no database",
        headers=VIEW_HEADERS,
    ),
    Scenario("sleep", "/sleep", "GET, the app sleeps 50 ms (threads matter)"),
    Scenario("echo", "/echo", "POST 1 MiB, echoed back with its CRC-32", method="POST"),
    Scenario(
        "file",
        "/file",
        f"GET, {FILE_SIZE // 1_000_000} MB file via wsgi.file_wrapper",
        ceiling=True,
        connections=FILE_CONNECTIONS,
        wrk_timeout=30,
    ),
]

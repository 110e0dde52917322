"""WSGI app for tests/it/operations.rs (config, logs, metrics): a few routes whose answers the tests can predict (stdlib only)."""

import logging
import os
import sys
import time
from urllib.parse import parse_qs

TEXT = [("Content-Type", "text/plain")]

# Bounds every wait in this app, so a server bug fails the test instead of hanging CI.
MAX_SLEEP_S = 10.0


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def pid(environ, start_response):
    # The worker's pid, so a test can match an access-log line or a metrics label to the process that served it.
    start_response("200 OK", list(TEXT))
    return [str(os.getpid()).encode()]


def echo_length(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", list(TEXT))
    return [str(len(body)).encode()]


def boom(environ, start_response):
    # The traceback carries whatever the request put in its path and X-Nasty header (quotes, backslashes,
    # control bytes, non-ASCII), unescaped, so a JSON log has to escape all of it.
    nasty = environ.get("PATH_INFO", "") + " | " + environ.get("HTTP_X_NASTY", "")
    environ["wsgi.errors"].write(f"about to fail: {nasty}\n")
    raise ValueError(f"ops boom: {nasty}")


def app_stderr(environ, start_response):
    # What apps commonly do besides wsgi.errors: print to stderr, and log through the stdlib (whose
    # last-resort handler also writes to stderr).
    marker = _query(environ).get("marker", "ops-stderr-marker")
    print(f"{marker} via print", file=sys.stderr, flush=True)
    logging.getLogger("ops_app").warning("%s via logging", marker)
    start_response("200 OK", list(TEXT))
    return [b"printed"]


def sleep(environ, start_response):
    seconds = min(float(_query(environ).get("s", "0")), MAX_SLEEP_S)
    time.sleep(seconds)
    start_response("200 OK", list(TEXT))
    return [b"slept"]


ROUTES = {
    "/pid": pid,
    "/echo_length": echo_length,
    "/sleep": sleep,
    "/stderr": app_stderr,
}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    # Anything under /boom fails, so a test can put odd bytes in the rest of the path.
    handler = boom if path.startswith("/boom") else ROUTES.get(path)
    if handler is None:
        start_response("404 Not Found", list(TEXT))
        return [b"no such route"]
    return handler(environ, start_response)

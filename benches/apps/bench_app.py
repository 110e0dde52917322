"""The one WSGI app every server in the benchmark loads (`bench_app:application`).

Each scenario of benches/bench.py is one route here, so all servers run exactly the same Python code:

    /hello      11 bytes, "hello world"
    /bytes64k   64 KiB from memory, with Content-Length
    /echo       POST: the request body back, with its CRC-32 in X-Body-Crc32
    /file       a big file (BENCH_FILE) through wsgi.file_wrapper, so a server may use sendfile(2)
    /stream     a generator of 16 chunks of 4 KiB, no Content-Length
    /flask/...  the small Flask app in flask_app.py
    /django/... the Django site in djsite (its /django/json view), imported on the first such request, with
                DJSITE_DIR set to a folder (the view needs no database; the site's settings ask for the folder)
    /sleep      sleeps 50 ms, then answers: shows how many requests a server runs at once

The route handlers are plain functions over the environ; nothing here is specific to one server.
"""

import os
import threading
import time
import zlib

from flask_app import app as flask_app

HELLO = b"hello world"
# 64 KiB of a repeating 0..255 pattern; bench.py writes the same bytes to a file for nginx's ceiling.
BYTES_64K = bytes(range(256)) * 256
STREAM_CHUNK = b"s" * 4096
STREAM_CHUNKS = 16
SLEEP_SECONDS = 0.05
# Block size for wsgi.file_wrapper when a server iterates the file instead of using sendfile(2): big enough that
# a 50 MB file is 200 blocks, small enough that a thread holds little memory.
FILE_BLOCK = 256 * 1024


def _plain(start_response, body, status="200 OK", extra=()):
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *extra])
    return [body]


def hello(environ, start_response):
    return _plain(start_response, HELLO)


def bytes64k(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BYTES_64K)))])
    return [BYTES_64K]


def echo(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST":
        return _plain(start_response, b"POST a body\n", "405 Method Not Allowed", [("Allow", "POST")])
    try:
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _plain(start_response, b"bad Content-Length\n", "400 Bad Request")
    stream = environ["wsgi.input"]
    parts = []
    crc = 0
    # read(n) may return fewer bytes than asked; loop until the declared length or EOF.
    while remaining > 0:
        part = stream.read(min(remaining, 1 << 20))
        if not part:
            break
        crc = zlib.crc32(part, crc)
        parts.append(part)
        remaining -= len(part)
    body = b"".join(parts)
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(body))),
            ("X-Body-Crc32", f"{crc:08x}"),
        ],
    )
    return [body]


def file(environ, start_response):
    path = os.environ.get("BENCH_FILE")
    if not path:
        return _plain(start_response, b"BENCH_FILE is not set\n", "500 Internal Server Error")
    # Not a with-block: the server closes the file when it is done with the wrapper (PEP 3333 close()).
    f = open(path, "rb")  # noqa: SIM115
    size = os.fstat(f.fileno()).st_size
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        return wrapper(f, FILE_BLOCK)
    return _iter_file(f)


def _iter_file(f):
    with f:
        while block := f.read(FILE_BLOCK):
            yield block


def stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return _chunks()


def _chunks():
    for _ in range(STREAM_CHUNKS):
        yield STREAM_CHUNK


def sleep(environ, start_response):
    time.sleep(SLEEP_SECONDS)
    return _plain(start_response, b"slept 50 ms")


_django_app = None
_django_lock = threading.Lock()


def django(environ, start_response):
    # Imported when first asked for, so that the other scenarios' memory figures do not carry Django.
    global _django_app
    if _django_app is None:
        with _django_lock:
            if _django_app is None:
                if not os.environ.get("DJSITE_DIR"):
                    return _plain(start_response, b"DJSITE_DIR is not set\n", "500 Internal Server Error")
                from djsite.wsgi import application as django_app

                _django_app = django_app
    return _django_app(environ, start_response)


ROUTES = {
    "/hello": hello,
    "/bytes64k": bytes64k,
    "/echo": echo,
    "/file": file,
    "/stream": stream,
    "/sleep": sleep,
}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    handler = ROUTES.get(path)
    if handler is not None:
        return handler(environ, start_response)
    if path.startswith("/flask/"):
        return flask_app(environ, start_response)
    if path.startswith("/django/"):
        return django(environ, start_response)
    return _plain(start_response, b"not found\n", "404 Not Found")

"""The bundled ferrule example: a plain WSGI app with no dependencies.

Run it behind nginx with `deploy/up`, or with ferrule installed into a venv (see the README's "Install"):
    python3 -m venv venv && venv/bin/pip install .    # from a clone of ferrule, or a ferrule-*.whl
    venv/bin/ferrule --socket unix:/tmp/hello.sock examples/hello/app.py

Routes:
    /        a small HTML page showing a few values from the WSGI environ (HTTP_HOST keeps a
             non-default port: see nginx/ferrule.conf); its stylesheet /static/hello.css comes from
             static/, served by nginx itself
    /echo    POST a body and get it back unchanged
    /stream  a response produced piece by piece by a generator (no Content-Length)
"""

import html
import time

SHOWN_KEYS = ("HTTP_HOST", "REMOTE_ADDR", "SERVER_PROTOCOL", "wsgi.url_scheme")


def index(environ, start_response):
    rows = "\n".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(environ.get(key, '')))}</td></tr>"
        for key in SHOWN_KEYS
    )
    page = f"""<!doctype html>
<html>
<head><meta charset="utf-8"><title>ferrule</title><link rel="stylesheet" href="/static/hello.css"></head>
<body>
<h1>Hello from ferrule</h1>
<p>This page is served by a Python WSGI app running in ferrule, behind nginx over the uwsgi protocol.</p>
<table>
{rows}
</table>
<p>Try <a href="/stream">/stream</a>, or POST a body to <code>/echo</code>.</p>
</body>
</html>
""".encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page)))],
    )
    return [page]


def echo(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST":
        start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "POST")])
        return [b"POST a body to /echo\n"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    content_type = environ.get("CONTENT_TYPE") or "application/octet-stream"
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])

    def chunks():
        for i in range(1, 6):
            yield f"chunk {i} of 5\n".encode()
            # Short pause so a client sees the pieces arrive one by one.
            time.sleep(0.1)

    return chunks()


def not_found(environ, start_response):
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


ROUTES = {"/": index, "/echo": echo, "/stream": stream}


def application(environ, start_response):
    handler = ROUTES.get(environ.get("PATH_INFO") or "/", not_found)
    return handler(environ, start_response)

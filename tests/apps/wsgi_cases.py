"""Plain-WSGI app for ferrule's tier-3 tests: one route per behaviour, dispatched on PATH_INFO (stdlib only)."""

import hashlib
import io
import json
import os
import random
import sys
import tempfile
import time
import warnings
import wsgiref.validate
from urllib.parse import parse_qs

# Any WSGI warning from the validator is a failure, not a line nobody reads.
warnings.simplefilter("error", wsgiref.validate.WSGIWarning)

TEXT = [("Content-Type", "text/plain")]

# Bounds every wait in this app, so a server bug fails the test instead of hanging CI.
GATE_TIMEOUT_S = 10.0


def _query(environ):
    """First value of each query parameter."""
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _digest(data):
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()


def _wait_for_file(path, timeout=GATE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.01)
    return False


def _text(start_response, body, status="200 OK"):
    start_response(status, list(TEXT))
    return [body]


# --- basics -----------------------------------------------------------------------------------------


def hello(environ, start_response):
    # Two extra headers pin that app headers keep their order and spelling.
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Order-A", "1"), ("x-order-b", "2")])
    return [b"hello world"]


def head(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Method", environ["REQUEST_METHOD"])])
    return [b"hello world"]


def no_content(environ, start_response):
    start_response("204 No Content", [("X-Empty", "yes")])
    return []


def not_modified(environ, start_response):
    start_response("304 Not Modified", [("ETag", '"v1"')])
    return []


def explicit_length(environ, start_response):
    # The app's own Content-Length must not be doubled.
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"exact"]


def which(environ, start_response):
    return _text(start_response, b"application")


def cwd(environ, start_response):
    return _text(start_response, os.getcwd().encode())


def sys_path(environ, start_response):
    return _text(start_response, json.dumps(sys.path).encode())


def sleep(environ, start_response):
    q = _query(environ)
    if "touch" in q:
        # Lets a test know the request reached the app before it acts (e.g. sends SIGTERM).
        open(q["touch"], "w").close()
    time.sleep(float(q.get("s", "1")))
    return _text(start_response, b"slept")


def gate(environ, start_response):
    q = _query(environ)
    if "touch" in q:
        open(q["touch"], "w").close()
    opened = _wait_for_file(q["path"])
    return _text(start_response, b"opened" if opened else b"gate timed out")


def touch(environ, start_response):
    open(_query(environ)["path"], "w").close()
    return _text(start_response, b"touched")


# --- environ ----------------------------------------------------------------------------------------


def environ_json(environ, start_response):
    out = {"str": {}, "types": {}, "flags": {}}
    for key, value in environ.items():
        if isinstance(value, str):
            out["str"][key] = value
        else:
            out["types"][key] = type(value).__name__
        if isinstance(value, bool):
            out["flags"][key] = value
    out["wsgi.version"] = list(environ.get("wsgi.version", ()))
    out["environ_type"] = type(environ).__name__
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(out, sort_keys=True, ensure_ascii=True).encode()]


def environ_key(environ, start_response):
    # ascii() shows each code point, so a latin-1-decoded byte 0xc3 reads back as '\xc3'.
    key = _query(environ)["key"]
    body = ascii(environ[key]) if key in environ else "<missing>"
    return _text(start_response, body.encode())


# --- wsgi.input -------------------------------------------------------------------------------------


def echo(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def input_read(environ, start_response):
    return _text(start_response, _digest(environ["wsgi.input"].read()))


def input_read_n(environ, start_response):
    inp, parts = environ["wsgi.input"], []
    while True:
        chunk = inp.read(8192)
        if not chunk:
            break
        assert len(chunk) <= 8192, len(chunk)
        parts.append(chunk)
    return _text(start_response, _digest(b"".join(parts)))


def input_readline(environ, start_response):
    inp, parts = environ["wsgi.input"], []
    while True:
        line = inp.readline()
        if not line:
            break
        # Every line but the last ends at a newline and holds no other.
        assert b"\n" not in line[:-1], line[:200]
        parts.append(line)
    return _text(start_response, _digest(b"".join(parts)))


def input_readline_limit(environ, start_response):
    inp, parts = environ["wsgi.input"], []
    while True:
        line = inp.readline(100)
        if not line:
            break
        assert len(line) <= 100, len(line)
        assert b"\n" not in line[:-1], line
        parts.append(line)
    return _text(start_response, _digest(b"".join(parts)))


def input_readlines(environ, start_response):
    return _text(start_response, _digest(b"".join(environ["wsgi.input"].readlines())))


def input_iter(environ, start_response):
    return _text(start_response, _digest(b"".join(line for line in environ["wsgi.input"])))


def input_overread(environ, start_response):
    # PEP 3333 "Input and Error Streams": the server must not let the app read past CONTENT_LENGTH,
    # and must return b"" (not block) at the end.
    inp = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    first = inp.read(length + 100)
    again = inp.read()
    sized = inp.read(10)
    line = inp.readline()
    body = b"%s %d %d %d" % (_digest(first), len(again), len(sized), len(line))
    return _text(start_response, body)


# --- response shapes --------------------------------------------------------------------------------


def stream(environ, start_response):
    q = _query(environ)
    n, delay, gate_path = int(q.get("n", "5")), float(q.get("delay", "0")), q.get("gate")
    start_response("200 OK", list(TEXT))

    def chunks():
        for i in range(n):
            if i == 1 and gate_path and not _wait_for_file(gate_path):
                # The client never saw chunk 0: the server held it back.
                yield b"gate timed out\n"
            if i and delay:
                time.sleep(delay)
            yield f"chunk {i}\n".encode()

    return chunks()


def list_body(environ, start_response):
    start_response("200 OK", list(TEXT))
    return [b"one ", b"two ", b"three"]


def tuple_body(environ, start_response):
    start_response("200 OK", list(TEXT))
    return (b"tu", b"ple")


def empty_chunks(environ, start_response):
    # Empty chunks must not end the response or be sent as anything.
    start_response("200 OK", list(TEXT))

    def chunks():
        yield b""
        yield b"a"
        yield b""
        yield b"b"

    return chunks()


def write_callable(environ, start_response):
    write = start_response("200 OK", list(TEXT))
    write(b"written ")
    write(b"data")
    return []


def write_then_iterable(environ, start_response):
    write = start_response("200 OK", list(TEXT))
    write(b"written ")
    return [b"then ", b"returned"]


def file_response(environ, start_response):
    q = _query(environ)
    size, offset, kind = int(q.get("size", "0")), int(q.get("offset", "0")), q.get("kind", "file")
    data = random.Random(size).randbytes(size)
    if kind == "bytesio":
        f = io.BytesIO(data)
    else:
        f = tempfile.TemporaryFile()
        f.write(data)
    # The file's current position is where the body starts, sendfile or not.
    f.seek(offset)
    expected = hashlib.sha256(data[offset:]).hexdigest()
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("X-Sha256", expected), ("X-Size", str(size - offset))],
    )
    return environ["wsgi.file_wrapper"](f, 65536)


# --- errors -----------------------------------------------------------------------------------------


def error_before(environ, start_response):
    raise ValueError("boom before start_response")


def error_after_start(environ, start_response):
    start_response("200 OK", list(TEXT))
    raise ValueError("boom after start_response")


def error_first_chunk(environ, start_response):
    start_response("200 OK", list(TEXT))

    def chunks():
        raise ValueError("boom in first chunk")
        yield b"never"

    return chunks()


def error_midstream(environ, start_response):
    start_response("200 OK", list(TEXT))

    def chunks():
        yield b"first chunk\n"
        raise ValueError("boom midstream")

    return chunks()


def error_bad_status(environ, start_response):
    start_response(_query(environ).get("status", "200"), list(TEXT))
    return [b"bad status"]


def error_bad_header(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Injected", "a\r\nSet-Cookie: evil=1")])
    return [b"bad header"]


def error_bad_header_name(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X Bad Name", "1")])
    return [b"bad header name"]


def error_hop_by_hop(environ, start_response):
    # PEP 3333 "Other HTTP Features": hop-by-hop headers from the app are an error.
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return [b"hop by hop"]


def error_non_bytes(environ, start_response):
    start_response("200 OK", list(TEXT))
    return ["a str, not bytes"]


def error_non_str_status(environ, start_response):
    start_response(b"200 OK", list(TEXT))
    return [b"bytes status"]


def error_no_start_response(environ, start_response):
    return [b"x"]


def exc_info_before_send(environ, start_response):
    # PEP 3333 "Error Handling": before anything is sent, start_response with exc_info replaces the headers.
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Dropped", "yes")])
    try:
        raise ValueError("handled by the app")
    except ValueError:
        start_response("503 Custom Failure", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"custom error body"]


def exc_info_after_send(environ, start_response):
    # After the headers went out, start_response with exc_info must re-raise: the server aborts.
    start_response("200 OK", list(TEXT))

    def chunks():
        yield b"first chunk\n"
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Oops", list(TEXT), sys.exc_info())
        yield b"must never be sent\n"

    return chunks()


def start_response_twice(environ, start_response):
    # Calling start_response a second time without exc_info is an error (PEP 3333 "The start_response() Callable").
    start_response("200 OK", list(TEXT))
    start_response("201 Created", list(TEXT))
    return [b"twice"]


def errors_stream(environ, start_response):
    marker = _query(environ).get("marker", "wsgi-errors-marker")
    errors = environ["wsgi.errors"]
    errors.write(f"{marker} via write\n")
    errors.writelines([f"{marker} via writelines\n"])
    errors.flush()
    return _text(start_response, b"logged")


def print_stderr(environ, start_response):
    marker = _query(environ).get("marker", "stderr-marker")
    print(marker, file=sys.stderr, flush=True)
    return _text(start_response, b"printed")


# --- close() ----------------------------------------------------------------------------------------


class Tracked:
    """An iterable whose close() appends a line to a file, so a test can see close() was called."""

    def __init__(self, path, mode):
        self.path, self.mode = path, mode

    def __iter__(self):
        if self.mode == "error_first":
            raise ValueError("close-tracking error before the first chunk")
        yield b"first "
        if self.mode == "error":
            raise ValueError("close-tracking error midstream")
        if self.mode == "long":
            # Far more than any socket buffer: the server must notice the client left and stop.
            chunk = b"x" * 65536
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                yield chunk
            return
        yield b"second"

    def close(self):
        with open(self.path, "a") as f:
            f.write("closed\n")


def close_tracking(environ, start_response):
    q = _query(environ)
    start_response("200 OK", list(TEXT))
    return Tracked(q["path"], q.get("mode", "ok"))


# --- wsgiref.validate -------------------------------------------------------------------------------


def _validated_inner(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"validated " + _digest(body)]


validated = wsgiref.validate.validator(_validated_inner)


# --- dispatch ---------------------------------------------------------------------------------------

ROUTES = {
    "/hello": hello,
    "/head": head,
    "/204": no_content,
    "/304": not_modified,
    "/explicit_length": explicit_length,
    "/which": which,
    "/cwd": cwd,
    "/sys_path": sys_path,
    "/sleep": sleep,
    "/gate": gate,
    "/touch": touch,
    "/environ": environ_json,
    "/environ/key": environ_key,
    "/echo": echo,
    "/input/read": input_read,
    "/input/read_n": input_read_n,
    "/input/readline": input_readline,
    "/input/readline_limit": input_readline_limit,
    "/input/readlines": input_readlines,
    "/input/iter": input_iter,
    "/input/overread": input_overread,
    "/stream": stream,
    "/list": list_body,
    "/tuple": tuple_body,
    "/empty_chunks": empty_chunks,
    "/write": write_callable,
    "/write_then_iterable": write_then_iterable,
    "/file": file_response,
    "/error/before": error_before,
    "/error/after_start": error_after_start,
    "/error/first_chunk": error_first_chunk,
    "/error/midstream": error_midstream,
    "/error/bad_status": error_bad_status,
    "/error/bad_header": error_bad_header,
    "/error/bad_header_name": error_bad_header_name,
    "/error/hop_by_hop": error_hop_by_hop,
    "/error/non_bytes": error_non_bytes,
    "/error/non_str_status": error_non_str_status,
    "/error/no_start_response": error_no_start_response,
    "/error/start_response_twice": start_response_twice,
    "/exc_info": exc_info_before_send,
    "/exc_info/late": exc_info_after_send,
    "/errors_stream": errors_stream,
    "/print_stderr": print_stderr,
    "/close_tracking": close_tracking,
    "/validator": validated,
}


def application(environ, start_response):
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    if handler is None:
        start_response("404 Not Found", list(TEXT))
        return [b"no such route"]
    return handler(environ, start_response)


def app(environ, start_response):
    """Second candidate name: `wsgi_cases` alone must pick `application` over this."""
    start_response("200 OK", list(TEXT))
    return [b"app"]


def create_app():
    """Factory form: `wsgi_cases:create_app()`."""
    return application


# `wsgi_cases:not_callable` must be refused at start-up.
not_callable = 42


# --- added for tests/e2e_nginx.rs (owned by the nginx end-to-end tests) ----------------------------


def error_midstream_with_length(environ, start_response):
    # With the app's own Content-Length nginx can count the missing bytes however the connection
    # ends; /error/midstream (no length) relies on ferrule making the close an error instead.
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1000")])

    def chunks():
        yield b"first chunk\n"
        raise ValueError("boom midstream with length")

    return chunks()


ROUTES["/e2e/error_midstream_with_length"] = error_midstream_with_length

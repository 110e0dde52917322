"""A uwsgi-protocol client for one request at a time over a Unix socket, as nginx's uwsgi_pass sends it: for
counting what one request costs a server (instructions, system calls) without nginx in the way."""

from __future__ import annotations

import socket
import struct

from .nginx import UWSGI_PARAMS


def packet(path: str, query: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A GET request's uwsgi packet: the CGI variables nginx's uwsgi_params sends, then the HTTP headers."""
    names = {name for name, _ in UWSGI_PARAMS}
    values = {
        "QUERY_STRING": query,
        "REQUEST_METHOD": "GET",
        "CONTENT_TYPE": "",
        "CONTENT_LENGTH": "",
        "REQUEST_URI": path + (f"?{query}" if query else ""),
        "PATH_INFO": path,
        "DOCUMENT_ROOT": "/usr/share/nginx/html",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_SCHEME": "http",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "SERVER_PORT": "80",
        "SERVER_NAME": "localhost",
    }
    pairs = [(k, v) for k, v in values.items() if k in names]
    pairs += [("HTTP_HOST", "localhost")]
    pairs += [("HTTP_" + name.upper().replace("-", "_"), value) for name, value in headers]
    body = b"".join(
        struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode() for k, v in pairs
    )
    return struct.pack("<BHB", 0, len(body), 0) + body


def request(sock_path: str, data: bytes, timeout: float = 60.0) -> bytes:
    """Sends one packet and reads the answer to its end (the server closes the connection); returns the raw
    HTTP response (status line, headers, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(data)
        parts = []
        while chunk := s.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


def status_of(response: bytes) -> int | None:
    """The status code of a raw HTTP response, or None if it has no status line."""
    line = response.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None

"""The command lines of the servers under test: the same workers, threads, venv and app folder for each.

`extra` is a variant's own options (ferrule --preload, uwsgi --lazy-apps, ...), which go right after the command
(after --master for uWSGI); `socket` is the listening option with whatever goes with it (a TLS socket's
certificate and key, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import APPS


def ferrule_command(
    ferrule, socket: list[str], workers: int, threads: int, venv, app: str, extra: Sequence[str] = ()
) -> list[str]:
    return [
        str(ferrule),
        *extra,
        *socket,
        "--workers", str(workers),
        "--threads", str(threads),
        "--virtualenv", str(venv),
        "--chdir", str(APPS),
        app,
    ]  # fmt: skip


def uwsgi_command(
    venv, socket: list[str], workers: int, threads: int, app: str, extra: Sequence[str] = (), request_logs=False
) -> list[str]:
    """`request_logs`: keep uWSGI's default of a log line per request (the benchmark otherwise turns it off, as
    the other servers log no requests by default)."""
    return [
        str(Path(venv) / "bin" / "uwsgi"),
        "--master",
        *extra,
        "--processes", str(workers),
        "--threads", str(threads),
        *socket,
        "--chdir", str(APPS),
        "--module", app,
        "--virtualenv", str(venv),
        "--need-app",
        # SIGTERM means reload to uWSGI unless told otherwise.
        "--die-on-term",
    ] + ([] if request_logs else [
        # uWSGI logs every request by default; the others do not.
        "--disable-logging",
    ])  # fmt: skip


def gunicorn_command(venv, bind: str, workers: int, threads: int, app: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        str(Path(venv) / "bin" / "gunicorn"),
        *extra,
        "--protocol", "uwsgi",
        "--worker-class", "gthread",
        "--workers", str(workers),
        "--threads", str(threads),
        "--bind", bind,
        # nginx's uwsgi_pass never reuses a connection; with keep-alive on (the default), gunicorn 27
        # waits for a next request, reads EOF and logs a traceback for every request.
        "--keep-alive", "0",
        # Otherwise it opens a control socket in ~/.gunicorn.
        "--no-control-socket",
        "--chdir", str(APPS),
        app,
    ]  # fmt: skip


def granian_command(venv, uds: Path, workers: int, threads: int, app: str) -> list[str]:
    return [
        str(Path(venv) / "bin" / "granian"),
        "--interface", "wsgi",
        "--http", "1",
        "--workers", str(workers),
        "--blocking-threads", str(threads),
        "--uds", str(uds),
        "--working-dir", str(APPS),
        app,
    ]  # fmt: skip

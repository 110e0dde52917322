"""WSGI app for ferrule's `--preload` tests (tests/it/preload.rs): what happened at import time (in which process,
how often, with which side effects) and what each forked worker inherited from it (stdlib only).

Environment, read at import:
- PRELOAD_IMPORT_LOG: a file that gets one line (`import pid=PID`) per import of this module.
- PRELOAD_START_THREAD=1: start a daemon thread while importing (what --preload warns about).
- PRELOAD_IMPORT_MIB=N: allocate and touch N MiB while importing, and keep them (shared with every fork).
- PRELOAD_PRINT=1: print a line to stdout and one to stderr while importing.
- PRELOAD_IMPORT_SLEEP=S: sleep S seconds while importing (a slow import, to act during it).

The module `preload_version`, if it is on the path, gives VERSION ("none" without it); the tests write it into a
directory they pass with --pythonpath, and a version module that raises makes the import of this app fail.
"""

import gc
import json
import os
import random
import sys
import threading
import time
from urllib.parse import parse_qs

# Bounds every wait in this app, so a server that never cuts a request off fails the test instead of hanging CI.
SLEEP_LIMIT_S = 60.0

IMPORT_PID = os.getpid()

_import_log = os.environ.get("PRELOAD_IMPORT_LOG")
if _import_log:
    # O_APPEND: concurrent imports (one per worker without --preload) each add a whole line.
    with open(_import_log, "a", encoding="utf-8") as f:
        f.write(f"import pid={IMPORT_PID}\n")

time.sleep(float(os.environ.get("PRELOAD_IMPORT_SLEEP", "0")))

# Python's fork hooks: under --preload they must run in each worker, with the worker's own pid.
AFTER_FORK = []
os.register_at_fork(after_in_child=lambda: AFTER_FORK.append(os.getpid()))

if os.environ.get("PRELOAD_START_THREAD") == "1":

    def _idle():
        while True:
            time.sleep(3600)

    threading.Thread(target=_idle, name="preload-import-thread", daemon=True).start()

# Memory made at import: under --preload the workers share these pages with the zygote until they write them.
_IMPORT_MIB = int(os.environ.get("PRELOAD_IMPORT_MIB", "0"))
# bytes * n writes every byte, so the pages are resident (a calloc'd buffer would not be).
IMPORT_BLOCK = b"\x01" * (_IMPORT_MIB << 20)

if os.environ.get("PRELOAD_PRINT") == "1":
    print(f"preload-import-print stdout pid={IMPORT_PID}", flush=True)
    print(f"preload-import-print stderr pid={IMPORT_PID}", file=sys.stderr, flush=True)

try:
    import preload_version

    VERSION = str(preload_version.VERSION)
except ImportError:
    VERSION = "none"

# Memory kept by /grow, so the worker's private memory stays up until it is replaced.
_KEPT = []
_KEPT_LOCK = threading.Lock()

TEXT = [("Content-Type", "text/plain")]


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _text(start_response, body, status="200 OK"):
    start_response(status, list(TEXT))
    return [body.encode()]


def info(environ, start_response):
    # An optional pause keeps this worker busy, so concurrent requests spread over the workers.
    time.sleep(min(float(_query(environ).get("s", "0")), SLEEP_LIMIT_S))
    body = json.dumps(
        {
            "pid": os.getpid(),
            "import_pid": IMPORT_PID,
            "ppid": os.getppid(),
            "after_fork": AFTER_FORK,
            "freeze_count": gc.get_freeze_count(),
            "random": random.random(),
            "version": VERSION,
            "multiprocess": environ["wsgi.multiprocess"],
        }
    )
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]


def grow(environ, start_response):
    mib = int(_query(environ).get("mib", "8"))
    block = b"\x02" * (mib << 20)
    with _KEPT_LOCK:
        _KEPT.append(block)
        kept = sum(len(b) for b in _KEPT) >> 20
    start_response("200 OK", list(TEXT) + [("X-Kept-MiB", str(kept))])
    return [str(os.getpid()).encode()]


def sleep(environ, start_response):
    seconds = min(float(_query(environ).get("s", "1")), SLEEP_LIMIT_S)
    time.sleep(seconds)
    return _text(start_response, str(os.getpid()))


ROUTES = {
    "/info": info,
    "/grow": grow,
    "/sleep": sleep,
}


def application(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", ""))
    if route is None:
        return _text(start_response, "no such route", "404 Not Found")
    return route(environ, start_response)

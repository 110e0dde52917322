"""ferrule's load benchmark: ferrule, uWSGI, gunicorn and granian behind one nginx, with nginx's own ceiling.

Run it through `benches/run`, which prepares the venv this script runs from: the peers, and ferrule pip-installed
from this checkout.

One nginx (generated config in a temp dir) has one location per server, all loading the same app
(benches/apps/bench_app.py) with the same number of worker processes and threads:

    /ferrule/   uwsgi_pass   ferrule --workers W --threads T
    /uwsgi/     uwsgi_pass   uwsgi --master --processes W --threads T
    /gunicorn/  uwsgi_pass   gunicorn --protocol uwsgi --worker-class gthread -w W --threads T
    /granian/   proxy_pass   granian --interface wsgi --workers W --blocking-threads T (HTTP/1.1, keepalive pool)
    /nginx/     nginx answers the same bytes itself: the ceiling, where that makes sense

Every server listens on a Unix socket, so the servers differ only in protocol and implementation. wrk drives each
location in turn (A B C D A B C D ...) for several rounds per scenario; the tables report medians across rounds.

The TLS scenario (tls-hello) runs a second instance of each server that speaks uwsgi over TLS, on a TCP port of
127.0.0.1, with the same workers and threads, behind locations of the same nginx:

    /ferrule-tls/  uwsgi_pass suwsgi://  ferrule --socket tls://127.0.0.1:P --tls-cert C --tls-key K
    /uwsgi-tls/    uwsgi_pass suwsgi://  uwsgi --ssl-socket 127.0.0.1:P,C,K

with `uwsgi_ssl_session_reuse on` and `uwsgi_ssl_verify on` against a private CA that deploy/make-certs writes
into the temp dir. gunicorn (its uwsgi protocol has no TLS) and granian (HTTP only) do not take part.

Per server and scenario it records requests/s, p50 and p99 latency, failed requests (non-2xx plus socket errors),
CPU time of the server's whole process tree per request (from /proc/<pid>/stat before and after each run), and
resident memory per worker, at idle (after start-up, before any load) and at its peak under load.

Outputs: tables on stdout, and in the results folder latest.csv (medians), latest-runs.csv (every run),
latest.md (tables, settings, machine, versions) and latest.png (throughput ratios).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
APPS = BENCHES / "apps"

sys.path.insert(0, str(APPS))
# The app's constants are the reference answers, and the bytes nginx serves as the ceiling.
import bench_app  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KIB_PER_MIB = 1024  # /proc reports memory in kB
FILE_SIZE = 50_000_000
POST_SIZE = 1 << 20
# The file scenario measures bandwidth: a few connections saturate it, more only queue.
FILE_CONNECTIONS = 4
# Bounds on waits, so a hung server fails the run instead of hanging it.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# A server that dies during the run is restarted this many times before it is left out.
MAX_RESTARTS = 2
REQUEST_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


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


# Servers with no uwsgi-over-TLS to measure, and why; the report says so under the TLS scenario.
NO_TLS = {
    "gunicorn": "its uwsgi protocol has no TLS",
    "granian": "it speaks HTTP, not uwsgi",
}

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
    Scenario("flask", "/flask/json", "GET, small Flask JSON view"),
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


# ---------------------------------------------------------------------------------------------------------------
# Servers


@dataclass
class Backend:
    name: str  # the server, as the results name it
    protocol: str  # "uwsgi", "http" or "nginx" (the ceiling)
    command: list[str] = field(default_factory=list)
    socket: Path | None = None
    # The TLS instance of a server (serves the tls scenarios only): its TCP port on 127.0.0.1.
    tls_port: int | None = None
    # A regular expression the server's log shows once all workers are up (else only the HTTP probe is used).
    ready_log: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    status: str = "ok"  # or why it is not in the results
    version: str = "?"
    idle_rss_mib: float | None = None
    idle_pss_mib: float | None = None
    restarts: int = 0
    # The TLS instance's session resumption and protocol, as a client of it saw them (checked once, at start).
    tls_seen: str = ""

    @property
    def tls(self) -> bool:
        return self.tls_port is not None

    @property
    def prefix(self) -> str:
        """The nginx location and upstream name; also names the server's log file."""
        return f"{self.name}-tls" if self.tls else self.name

    def serves(self, scenario: Scenario) -> bool:
        return self.protocol == "nginx" or self.tls == scenario.tls


def build_backends(args: argparse.Namespace, tmp: Path) -> list[Backend]:
    venv_bin = Path(args.venv) / "bin"
    w, t = str(args.workers), str(args.threads)
    app = "bench_app:application"
    backends = [
        Backend(
            "ferrule",
            "uwsgi",
            [
                str(args.ferrule),
                "--socket", f"unix:{tmp / 'ferrule.sock'}",
                "--workers", w,
                "--threads", t,
                "--virtualenv", str(args.venv),
                "--chdir", str(APPS),
                app,
            ],
            tmp / "ferrule.sock",
            ready_log=rf"ready workers={args.workers}\b",
        ),
        Backend(
            "uwsgi",
            "uwsgi",
            [
                str(venv_bin / "uwsgi"),
                "--master",
                "--processes", w,
                "--threads", t,
                "--socket", str(tmp / "uwsgi.sock"),
                "--chdir", str(APPS),
                "--module", app,
                "--virtualenv", str(args.venv),
                "--need-app",
                # SIGTERM means reload to uWSGI unless told otherwise.
                "--die-on-term",
                # uWSGI logs every request by default; the others do not.
                "--disable-logging",
            ],
            tmp / "uwsgi.sock",
        ),
        Backend(
            "gunicorn",
            "uwsgi",
            [
                str(venv_bin / "gunicorn"),
                "--protocol", "uwsgi",
                "--worker-class", "gthread",
                "--workers", w,
                "--threads", t,
                "--bind", f"unix:{tmp / 'gunicorn.sock'}",
                # nginx's uwsgi_pass never reuses a connection; with keep-alive on (the default), gunicorn 27
                # waits for a next request, reads EOF and logs a traceback for every request.
                "--keep-alive", "0",
                # Otherwise it opens a control socket in ~/.gunicorn.
                "--no-control-socket",
                "--chdir", str(APPS),
                app,
            ],
            tmp / "gunicorn.sock",
        ),
        Backend(
            "granian",
            "http",
            [
                str(venv_bin / "granian"),
                "--interface", "wsgi",
                "--http", "1",
                "--workers", w,
                "--blocking-threads", t,
                "--uds", str(tmp / "granian.sock"),
                "--working-dir", str(APPS),
                app,
            ],
            tmp / "granian.sock",
        ),
    ]  # fmt: skip
    wanted = set(args.servers)
    chosen = [b for b in backends if b.name in wanted] if any(not sc.tls for sc in SCENARIOS) else []
    if any(sc.tls for sc in SCENARIOS):
        chosen += [b for b in tls_backends(args, tmp) if b.name in wanted]
    return chosen + [Backend("nginx", "nginx")]


def tls_backends(args: argparse.Namespace, tmp: Path) -> list[Backend]:
    """The TLS instances: the same servers with the same settings, each on a TLS port of 127.0.0.1, with the
    certificate and key that make_certs writes into tmp/tls."""
    venv_bin = Path(args.venv) / "bin"
    w, t = str(args.workers), str(args.threads)
    app = "bench_app:application"
    cert, key = tmp / "tls" / "ferrule.crt", tmp / "tls" / "ferrule.key"
    ferrule_port, uwsgi_port = free_port(), free_port()
    return [
        Backend(
            "ferrule",
            "uwsgi",
            [
                str(args.ferrule),
                "--socket", f"tls://127.0.0.1:{ferrule_port}",
                "--tls-cert", str(cert),
                "--tls-key", str(key),
                # Only to read its TLS handshake counters (full, resumed) through nginx after the scenario.
                "--metrics", f"unix:{tmp / 'ferrule-tls-metrics.sock'}",
                "--workers", w,
                "--threads", t,
                "--virtualenv", str(args.venv),
                "--chdir", str(APPS),
                app,
            ],
            tls_port=ferrule_port,
            ready_log=rf"ready workers={args.workers}\b",
        ),
        Backend(
            "uwsgi",
            "uwsgi",
            [
                str(venv_bin / "uwsgi"),
                "--master",
                "--processes", w,
                "--threads", t,
                "--ssl-socket", f"127.0.0.1:{uwsgi_port},{cert},{key}",
                "--chdir", str(APPS),
                "--module", app,
                "--virtualenv", str(args.venv),
                "--need-app",
                "--die-on-term",
                "--disable-logging",
            ],
            tls_port=uwsgi_port,
        ),
    ]  # fmt: skip


def make_certs(tmp: Path) -> Path:
    """A private CA and a server certificate for localhost and 127.0.0.1 (deploy/make-certs, EC P-256), in tmp/tls."""
    certs = tmp / "tls"
    p = subprocess.run(
        [str(REPO / "deploy" / "make-certs"), "--dir", str(certs), "DNS:localhost,IP:127.0.0.1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if p.returncode != 0:
        raise RuntimeError(f"deploy/make-certs failed: {(p.stdout + p.stderr).strip()}")
    return certs


def version_of(backend: Backend, args: argparse.Namespace) -> str:
    try:
        if backend.name == "ferrule":
            out = run_quiet([str(args.ferrule), "--version"])
            # The package is built from the work tree: say which commit, and whether it had local changes.
            commit = git_commit()
            return (out.split()[-1] if out else "?") + (f" (git {commit})" if commit else "")
        if backend.name == "uwsgi":
            return run_quiet([backend.command[0], "--version"]).strip() or "?"
        if backend.name in ("gunicorn", "granian"):
            return package_version(args.venv, backend.name)
        if backend.name == "nginx":
            return nginx_version(args.nginx)
    except OSError:
        pass
    return "?"


def python_version(venv: str) -> str:
    python = Path(venv) / "bin" / "python"
    out = run_quiet([str(python), "-c", "import platform; print(platform.python_version())"])
    return f"{out or '?'} ({python.resolve()})"


def package_version(venv: str, package: str) -> str:
    """The version of a package installed in the venv the servers run from (not necessarily this one)."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        p = subprocess.run(
            [str(Path(venv) / "bin" / "python"), "-c", code], check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return p.stdout.strip() if p.returncode == 0 else "not installed"


def run_quiet(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout + p.stderr).strip()


def git_commit() -> str:
    try:
        p = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--exclude", "*"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


def nginx_version(nginx: str) -> str:
    m = re.search(r"nginx/(\S+)", run_quiet([nginx, "-v"]))
    return m.group(1) if m else "?"


# ---------------------------------------------------------------------------------------------------------------
# Processes: start in their own process group, stop by that group, always


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Best effort for a bench.py killed with SIGKILL: the direct child gets SIGKILL too. Normal exits, Ctrl-C and
    # SIGTERM go through stop_group() instead, which also reaches the children's own workers.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_process(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    # The child keeps its own copy of the descriptor; ours is closed as soon as it is started.
    log = open(log_path, "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            # Safe here: processes are started before any sampler thread exists.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
    finally:
        log.close()


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stops a process started by start_process and everything in its process group."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session made it the leader of its own group
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"  pid {proc.pid} did not stop within {STOP_TIMEOUT:.0f} s; killing its group", file=sys.stderr)
    # Workers left behind (or the leader itself after the timeout) go with the group.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so the finally blocks stop every server."""


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------------------------------
# /proc: process trees, CPU time, memory


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces or ')'; the fields follow the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    # utime, stime, and the times of reaped children (a worker replaced during a run still counts).
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ppid, ticks


def process_tree(root: int) -> list[int]:
    """The root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        st = _proc_stat(pid)
        if st is not None:
            total += st[1]
    return total / CLOCK_TICKS


def workers_of(root: int) -> list[int]:
    """The worker processes: every descendant of the master (all four servers fork their workers from it)."""
    return process_tree(root)[1:]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / KIB_PER_MIB
    except OSError:
        pass
    return None


def pss_mib(pid: int) -> float | None:
    """Proportional set size: RSS with pages shared after fork split between the sharers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / KIB_PER_MIB
    except OSError:
        pass
    return None


def mean_per_worker(root: int, measure) -> float | None:
    values = [v for v in (measure(p) for p in workers_of(root)) if v is not None]
    return statistics.fmean(values) if values else None


class MemorySampler:
    """Samples the mean RSS and PSS per worker while a load runs, keeping the peaks."""

    def __init__(self, root: int | None, interval: float = 0.25):
        self.root, self.interval = root, interval
        self.peak_rss: float | None = None
        self.peak_pss: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.root is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self):
        while True:
            rss = mean_per_worker(self.root, rss_mib)
            pss = mean_per_worker(self.root, pss_mib)
            if rss is not None:
                self.peak_rss = max(rss, self.peak_rss or 0.0)
            if pss is not None:
                self.peak_pss = max(pss, self.peak_pss or 0.0)
            if self._stop.wait(self.interval):
                return


# ---------------------------------------------------------------------------------------------------------------
# nginx


UWSGI_PARAMS = [
    # The CGI variables nginx sends with uwsgi_pass, as in the uwsgi_params file Debian ships.
    ("QUERY_STRING", "$query_string"),
    ("REQUEST_METHOD", "$request_method"),
    ("CONTENT_TYPE", "$content_type"),
    ("CONTENT_LENGTH", "$content_length"),
    ("REQUEST_URI", "$request_uri"),
    ("PATH_INFO", "$document_uri"),
    ("DOCUMENT_ROOT", "$document_root"),
    ("SERVER_PROTOCOL", "$server_protocol"),
    ("REQUEST_SCHEME", "$scheme"),
    ("HTTPS", "$https if_not_empty"),
    ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"),
    ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$server_name"),
]


def nginx_config(args: argparse.Namespace, tmp: Path, port: int, backends: list[Backend]) -> str:
    params = "\n".join(f"            uwsgi_param {k} {v};" for k, v in UWSGI_PARAMS)
    upstreams, locations = [], []
    for b in backends:
        if b.protocol == "uwsgi" and b.tls:
            upstreams.append(f"    upstream {b.prefix} {{\n        server 127.0.0.1:{b.tls_port};\n    }}")
            locations.append(
                f"""        location /{b.prefix}/ {{
            rewrite ^/{b.prefix}(/.*)$ $1 break;
{params}
            uwsgi_pass suwsgi://{b.prefix};
            # nginx 1.22 leaves TLS 1.3 out of its default protocols.
            uwsgi_ssl_protocols TLSv1.2 TLSv1.3;
            # Every request is a new connection (uwsgi has no keepalive): a full handshake only when the
            # session is new, a resumed one otherwise.
            uwsgi_ssl_session_reuse on;
            uwsgi_ssl_verify on;
            uwsgi_ssl_trusted_certificate {tmp / "tls" / "ca.crt"};
            uwsgi_ssl_name localhost;
        }}"""
            )
            if b.name == "ferrule":
                locations.append(
                    f"""        location = /{b.prefix}/metrics {{
{params}
            uwsgi_pass unix:{tmp / "ferrule-tls-metrics.sock"};
        }}"""
                )
        elif b.protocol == "uwsgi":
            # The uwsgi protocol ends a response by closing the connection: no keepalive pool is possible.
            upstreams.append(f"    upstream {b.name} {{\n        server unix:{b.socket};\n    }}")
            locations.append(
                f"""        location /{b.name}/ {{
            # The app sees PATH_INFO without the server's prefix, as it would at the root of a site.
            rewrite ^/{b.name}(/.*)$ $1 break;
{params}
            uwsgi_pass {b.name};
        }}"""
            )
        elif b.protocol == "http":
            upstreams.append(
                f"    upstream {b.name} {{\n        server unix:{b.socket};\n        keepalive 32;\n    }}"
            )
            locations.append(
                f"""        location /{b.name}/ {{
            proxy_pass http://{b.name}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}"""
            )
    locations.append(
        f"""        # The ceiling: nginx answers the same bytes itself.
        location = /nginx/hello {{
            default_type text/plain;
            return 200 "hello world";
        }}
        location = /nginx/bytes64k {{
            alias {tmp / "bytes64k.bin"};
        }}
        location = /nginx/file {{
            alias {tmp / "file.bin"};
        }}"""
    )
    http_settings = """    sendfile on;
    tcp_nopush on;
    # wrk keeps its connections for the whole run; nginx's default of 1000 requests would reconnect mid-run.
    keepalive_requests 1000000;
    # The 1 MiB POST stays in memory instead of a temp file.
    client_max_body_size 4m;
    client_body_buffer_size 2m;
    # Large responses flow through nginx's buffers at the client's pace instead of being spooled to disk:
    # the file scenario then measures the server, not nginx's temp files.
    uwsgi_max_temp_file_size 0;
    proxy_max_temp_file_size 0;"""
    return nginx_conf_text(
        "benches/bench.py", args.nginx_workers, 4096, tmp, port, http_settings, upstreams, locations
    )


def nginx_conf_text(
    generated_by: str,
    nginx_workers,
    worker_connections: int,
    tmp: Path,
    port: int,
    http_settings: str,
    upstreams: list[str],
    locations: list[str],
) -> str:
    """A whole nginx.conf for one benchmark run: its files in `tmp`, one server on 127.0.0.1:`port`."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / ('nginx-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    upstream_text = "\n".join(upstreams)
    location_text = "\n".join(locations)
    return f"""# Generated by {generated_by} for one benchmark run.
{user}worker_processes {nginx_workers};
pid {tmp / "nginx.pid"};
error_log {tmp / "nginx-error.log"} warn;
daemon off;

events {{
    worker_connections {worker_connections};
}}

http {{
    access_log off;
{temp_paths}
    default_type application/octet-stream;
{http_settings}

{upstream_text}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

{location_text}
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Requests: readiness probes and answer checks


def request(port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = REQUEST_TIMEOUT):
    """One request through nginx; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def wait_ready(backend: Backend, port: int, workers: int) -> None:
    """Waits until the server answers through nginx and all its workers exist; raises RuntimeError if not."""
    deadline = time.monotonic() + START_TIMEOUT
    ready_re = re.compile(backend.ready_log) if backend.ready_log else None
    last = "no answer yet"
    while time.monotonic() < deadline:
        if backend.proc.poll() is not None:
            raise RuntimeError(f"exited with status {backend.proc.returncode}: {log_tail(backend.log_path)}")
        if ready_re is not None:
            # ANSI colour codes would split the fields if the log is coloured.
            text = re.sub(r"\x1b\[[0-9;]*m", "", backend.log_path.read_text(errors="replace"))
            if not ready_re.search(text):
                time.sleep(0.1)
                continue
        try:
            status, _, _ = request(port, f"/{backend.prefix}/hello", timeout=5)
            last = f"HTTP {status}"
            if status == 200 and len(workers_of(backend.proc.pid)) >= workers:
                return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {START_TIMEOUT:.0f} s ({last}): {log_tail(backend.log_path)}")


def revive(b: Backend, args, port: int, env: dict[str, str], tmp: Path, problems: list[str]) -> bool:
    """Whether the server can be measured: true if it is running, else restarts it once it has died."""
    if b.protocol == "nginx":
        return True
    if b.status != "ok" or b.proc is None:
        return False
    if b.proc.poll() is None:
        return True
    problems.append(f"{b.name} exited during the run (status {b.proc.returncode}): {log_tail(b.log_path)}")
    print(f"  {b.name} exited (status {b.proc.returncode}); restarting it", file=sys.stderr)
    stop_group(b.proc)  # its workers may outlive it
    b.restarts += 1
    if b.restarts > MAX_RESTARTS:
        b.status, b.proc = "died", None
        return False
    b.log_path = tmp / f"{b.prefix}-{b.restarts}.log"
    b.proc = start_process(b.command, b.log_path, env)
    try:
        wait_ready(b, port, args.workers)
    except RuntimeError as e:
        problems.append(f"{b.name}: restart failed: {e}")
        stop_group(b.proc)
        b.status, b.proc = "died", None
        return False
    return True


def log_tail(path: Path | None, lines: int = 8) -> str:
    if path is None or not path.exists():
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
    return " | ".join(text.strip().splitlines()[-lines:])


@dataclass
class Expected:
    post_body: bytes
    file_crc: int


def check_answer(port: int, backend: Backend, scenario: Scenario, expected: Expected) -> str | None:
    """Sends one request of the scenario and checks the answer; returns what is wrong, or None."""
    path = f"/{backend.prefix}{scenario.path}"
    body = expected.post_body if scenario.method == "POST" else None
    try:
        status, headers, got = request(port, path, scenario.method, body)
    except OSError as e:
        return f"request failed: {e}"
    if status != 200:
        return f"HTTP {status}"
    name = scenario.name
    if name in ("hello", "tls-hello") and got != bench_app.HELLO:
        return f"body {got[:40]!r}"
    if name == "bytes64k" and got != bench_app.BYTES_64K:
        return f"wrong {len(got)}-byte body"
    if name == "stream" and got != bench_app.STREAM_CHUNK * bench_app.STREAM_CHUNKS:
        return f"wrong {len(got)}-byte body"
    if name == "sleep" and got != b"slept 50 ms":
        return f"body {got[:40]!r}"
    if name == "flask":
        try:
            doc = json.loads(got)
        except ValueError:
            return f"not JSON: {got[:40]!r}"
        if doc != {"message": "hello world", "ok": True, "items": [1, 2, 3, 4, 5]}:
            return f"JSON {doc!r}"
    if name == "echo":
        want_crc = f"{zlib.crc32(expected.post_body):08x}"
        crc = {k.lower(): v for k, v in headers.items()}.get("x-body-crc32")
        if got != expected.post_body or crc != want_crc:
            return f"echo mismatch ({len(got)} bytes, crc {crc}, want {want_crc})"
    if name == "file" and (len(got) != FILE_SIZE or zlib.crc32(got) != expected.file_crc):
        return f"wrong {len(got)}-byte file"
    return None


# ---------------------------------------------------------------------------------------------------------------
# TLS: what a server's TLS instance negotiates and whether it resumes sessions


def uwsgi_packet(path: str) -> bytes:
    """A uwsgi request for GET `path`, with the vars nginx sends."""
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "REQUEST_URI": path, "QUERY_STRING": "",
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "1"}  # fmt: skip
    data = b"".join(
        len(k).to_bytes(2, "little") + k.encode() + len(v).to_bytes(2, "little") + v.encode() for k, v in env.items()
    )
    return bytes([0]) + len(data).to_bytes(2, "little") + bytes([0]) + data


def tls_resumption(backend: Backend, certs: Path, tries: int = 8) -> str:
    """Connects `tries` + 1 times as nginx does (verifying the certificate for localhost, a request per
    connection), each time offering the last session; says the protocol, cipher and how many were resumed.
    A server that resumes nothing makes every request of the TLS scenario a full handshake."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    session, resumed, seen = None, 0, ""
    try:
        for i in range(tries + 1):
            with socket.create_connection(("127.0.0.1", backend.tls_port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                    seen = f"{tls.version()}, {tls.cipher()[0]}"  # before the close, which forgets them
                    if i and tls.session_reused:
                        resumed += 1
                    tls.sendall(uwsgi_packet("/hello"))
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
                    if not answer.endswith(bench_app.HELLO):
                        return f"wrong answer over TLS: {answer[:60]!r}"
                    # Read after the answer: a TLS 1.3 ticket arrives after the handshake.
                    session = tls.session
    except (OSError, ssl.SSLError) as e:
        return f"TLS check failed: {e}"
    return f"{seen}, {resumed}/{tries} sessions resumed by a fresh client"


def ferrule_handshakes(port: int) -> str | None:
    """ferrule's TLS handshake counters so far (its --metrics, through nginx), e.g. "120 full, 80,000 resumed"."""
    try:
        status, _, body = request(port, "/ferrule-tls/metrics", timeout=10)
    except OSError:
        return None
    kinds = dict(re.findall(rb'^ferrule_tls_handshakes_total\{kind="(\w+)"\} (\d+)', body, re.MULTILINE))
    if status != 200 or not kinds:
        return None
    full, resumed = int(kinds.get(b"full", 0)), int(kinds.get(b"resumed", 0))
    return f"{full:,} full and {resumed:,} resumed ({100 * resumed / max(full + resumed, 1):.1f}%)"


# ---------------------------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    def grab(pattern: str) -> re.Match | None:
        return re.search(pattern, out, re.MULTILINE)

    done = grab(r"^\s*(\d+) requests in ([\d.]+\w+),")
    rps = grab(r"^Requests/sec:\s+([\d.]+)")
    p50 = grab(r"^\s+50%\s+(\S+)")
    p99 = grab(r"^\s+99%\s+(\S+)")
    if not (done and rps):
        raise ValueError(f"could not read wrk's output:\n{out}")
    errors = grab(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non2xx = grab(r"Non-2xx or 3xx responses: (\d+)")
    return WrkResult(
        requests=int(done.group(1)),
        seconds=_duration_ms(done.group(2)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=_duration_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_duration_ms(p99.group(1)) if p99 else float("nan"),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def wrk_command(args, port: int, backend: Backend, scenario: Scenario, duration: int, tmp: Path) -> list[str]:
    cmd = [
        args.wrk,
        f"--threads={args.wrk_threads}",
        f"--connections={scenario.connections or args.connections}",
        f"--duration={duration}s",
        f"--timeout={scenario.wrk_timeout}s",
        "--latency",
    ]
    if scenario.method == "POST":
        cmd.append(f"--script={tmp / 'post.lua'}")
    cmd.append(f"http://127.0.0.1:{port}/{backend.prefix}{scenario.path}")
    return cmd


def run_wrk(cmd: list[str], duration: int) -> str:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=duration + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with status {proc.returncode}: {out.strip()}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# One run and the summaries


@dataclass
class Run:
    scenario: str
    server: str
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    cpu_us_per_req: float | None
    nginx_cpu_us_per_req: float | None
    rss_mib: float | None
    pss_mib: float | None


def measure(args, port, backend: Backend, nginx_proc, scenario: Scenario, rnd: int, tmp: Path) -> Run:
    root = backend.proc.pid if backend.proc else None
    cmd = wrk_command(args, port, backend, scenario, args.duration, tmp)
    with MemorySampler(root) as mem:
        cpu0 = tree_cpu_seconds(root) if root else None
        ngx0 = tree_cpu_seconds(nginx_proc.pid)
        out = run_wrk(cmd, args.duration)
        cpu1 = tree_cpu_seconds(root) if root else None
        ngx1 = tree_cpu_seconds(nginx_proc.pid)
    res = parse_wrk(out)
    per_req = 1e6 / res.requests if res.requests else None
    return Run(
        scenario=scenario.name,
        server=backend.name,
        round=rnd,
        requests=res.requests,
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        failed=res.non2xx + res.socket_errors,
        cpu_us_per_req=(cpu1 - cpu0) * per_req if root and per_req else None,
        nginx_cpu_us_per_req=(ngx1 - ngx0) * per_req if per_req else None,
        rss_mib=mem.peak_rss,
        pss_mib=mem.peak_pss,
    )


def median(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def summarise(runs: list[Run], backends: list[Backend]) -> list[dict]:
    rows = []
    for sc in SCENARIOS:
        for b in backends:
            if not b.serves(sc):
                continue
            mine = [r for r in runs if r.scenario == sc.name and r.server == b.name]
            if not mine:
                continue
            rows.append(
                {
                    "scenario": sc.name,
                    "server": b.name,
                    "rounds": len(mine),
                    "requests": sum(r.requests for r in mine),
                    "rps": median(r.rps for r in mine),
                    "p50_ms": median(r.p50_ms for r in mine),
                    "p99_ms": median(r.p99_ms for r in mine),
                    "failed": sum(r.failed for r in mine),
                    "cpu_us_per_req": median(r.cpu_us_per_req for r in mine),
                    "nginx_cpu_us_per_req": median(r.nginx_cpu_us_per_req for r in mine),
                    "rss_mib": median(r.rss_mib for r in mine),
                    "pss_mib": median(r.pss_mib for r in mine),
                    "idle_rss_mib": b.idle_rss_mib,
                    "idle_pss_mib": b.idle_pss_mib,
                }
            )
    # Fractions of the ceiling, and ferrule/peer ratios for every metric.
    by_key = {(r["scenario"], r["server"]): r for r in rows}
    for r in rows:
        ceiling = by_key.get((r["scenario"], "nginx"))
        r["of_ceiling"] = r["rps"] / ceiling["rps"] if ceiling and ceiling["rps"] and r["rps"] else None
        fer = by_key.get((r["scenario"], "ferrule"))
        for metric in RATIO_METRICS:
            ratio = None
            if fer and r["server"] not in ("ferrule", "nginx") and fer[metric] and r[metric]:
                ratio = fer[metric] / r[metric]
            r[f"ferrule_over_{metric}"] = ratio
    return rows


RATIO_METRICS = ["rps", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mib", "idle_rss_mib"]
CSV_FIELDS = [
    "scenario", "server", "rounds", "requests", "rps", "of_ceiling", "p50_ms", "p99_ms", "failed",
    "cpu_us_per_req", "nginx_cpu_us_per_req", "rss_mib", "idle_rss_mib", "pss_mib", "idle_pss_mib",
] + [f"ferrule_over_{m}" for m in RATIO_METRICS]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Output


def fmt(value, digits=1, suffix="") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; with `numeric`, every column but the first is right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def server_names(backends: list[Backend]) -> list[str]:
    """Each server once, in the order of the run (a server's TLS instance is the same server)."""
    return list(dict.fromkeys(b.name for b in backends))


def results_tables(rows: list[dict], backends: list[Backend], args, notes: dict[str, list[str]]) -> str:
    parts = []
    names = server_names(backends)
    servers = [n for n in names if n != "nginx"]

    # 1. Throughput overview: scenarios down, servers across.
    head = ["scenario"] + [f"{n} req/s" for n in names]
    body = []
    for sc in SCENARIOS:
        cells = [sc.name]
        have = False
        for n in names:
            r = next((x for x in rows if x["scenario"] == sc.name and x["server"] == n), None)
            have |= r is not None
            cells.append(fmt(r["rps"], 0) if r else "–")
        if have:
            body.append(cells)
    parts.append("### Throughput (requests/s, median of rounds)\n\n" + md_table(head, body))

    # 2. ferrule / peer ratios.
    head = ["scenario", "peer", "req/s", "p50", "p99", "CPU/req", "RSS/worker (load)", "RSS/worker (idle)"]
    body = []
    for sc in SCENARIOS:
        for n in servers:
            if n == "ferrule":
                continue
            r = next((x for x in rows if x["scenario"] == sc.name and x["server"] == n), None)
            if r:
                body.append([sc.name, n] + [ratio(r[f"ferrule_over_{m}"]) for m in RATIO_METRICS])
    parts.append(
        "### ferrule / peer\n\nEach cell is ferrule's value divided by the peer's: above 1 is better for req/s, "
        "below 1 is better for latency, CPU and memory.\n\n" + md_table(head, body)
    )

    # 3. Every metric, one table per scenario.
    head = ["server", "req/s", "of nginx", "p50 ms", "p99 ms", "failed", "CPU µs/req", "nginx CPU µs/req",
            "RSS MiB/worker load", "RSS MiB/worker idle", "PSS MiB/worker load"]  # fmt: skip
    for sc in SCENARIOS:
        mine = [x for x in rows if x["scenario"] == sc.name]
        if not mine:
            continue
        body = []
        for r in mine:
            body.append(
                [
                    r["server"],
                    fmt(r["rps"], 0),
                    fmt(r["of_ceiling"] * 100, 0, "%") if r["of_ceiling"] is not None else "–",
                    fmt(r["p50_ms"], 2),
                    fmt(r["p99_ms"], 2),
                    str(r["failed"]),
                    fmt(r["cpu_us_per_req"], 0),
                    fmt(r["nginx_cpu_us_per_req"], 0),
                    fmt(r["rss_mib"], 1),
                    fmt(r["idle_rss_mib"], 1),
                    fmt(r["pss_mib"], 1),
                ]
            )
        conns = sc.connections or args.connections
        text = f"### {sc.name}: {sc.description}, {conns} connections\n\n" + md_table(head, body)
        if notes.get(sc.name):
            text += "\n\n" + "\n".join(f"- {n}" for n in notes[sc.name])
        parts.append(text)
    return "\n\n".join(parts)


def machine_info(args, backends: list[Backend]) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_v = run_quiet([args.wrk, "-v"]).splitlines()
    info = [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cores (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu),
        ("kernel", platform.release()),
        ("python", python_version(args.venv)),
        ("wrk", wrk_v[0].split()[1] if wrk_v and len(wrk_v[0].split()) > 1 else "?"),
    ]
    for b in backends:
        if b.tls and b.status == "ok":
            continue  # the same server as its Unix-socket instance
        info.append((b.prefix, b.version + ("" if b.status == "ok" else f" ({b.status})")))
    info.append(("flask", package_version(args.venv, "flask")))
    return info


SETUP_NOTES = [
    (
        "All servers load `benches/apps/bench_app.py` from the same venv and listen on a Unix socket; nginx reaches "
        "ferrule, uWSGI and gunicorn with `uwsgi_pass` (a new connection per request: the protocol has no keepalive) "
        "and granian with `proxy_pass` over HTTP/1.1 with a keepalive pool of 32."
    ),
    (
        "uWSGI: `--master --processes W --threads T --die-on-term --disable-logging` (it logs every request "
        "otherwise; the others do not)."
    ),
    (
        "gunicorn: `--protocol uwsgi --worker-class gthread --keep-alive 0 --no-control-socket`. With its default "
        "keep-alive, gunicorn 27 waits for a second request on each uwsgi connection, reads nginx's close and logs "
        "an error with a traceback for every request (about 3x slower)."
    ),
    "granian: `--interface wsgi --http 1 --blocking-threads T --uds`.",
    (
        "nginx: `uwsgi_max_temp_file_size 0` and `proxy_max_temp_file_size 0`, so big responses flow through its "
        "memory buffers instead of temp files; `client_body_buffer_size 2m` keeps the 1 MiB POST in memory; the "
        "ceiling's 64 KiB and 50 MB answers are static files sent with `sendfile on`."
    ),
]


TLS_NOTE = (
    "TLS scenario: a second instance of ferrule (`--socket tls://127.0.0.1:P --tls-cert --tls-key`, plus "
    "`--metrics` on a Unix socket to read its handshake counters) and of uWSGI (`--ssl-socket 127.0.0.1:P,CRT,KEY`), "
    "same workers and threads, no client certificate asked; nginx `uwsgi_pass suwsgi://` with `uwsgi_ssl_protocols "
    "TLSv1.2 TLSv1.3`, `uwsgi_ssl_session_reuse on`, `uwsgi_ssl_verify on` and `uwsgi_ssl_name localhost` against "
    "a private CA (deploy/make-certs: EC P-256, SANs DNS:localhost, IP:127.0.0.1). CPU/req includes the server's "
    "TLS work; nginx's side of it is in nginx CPU."
)


def write_outputs(
    args, rows: list[dict], runs: list[Run], backends: list[Backend], problems: list[str], notes: dict[str, list[str]]
) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "latest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with open(out / "latest-runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        fields = list(Run.__dataclass_fields__)
        w.writerow(fields)
        for r in runs:
            w.writerow([(f"{v:.6g}" if isinstance(v, float) else v) for v in (getattr(r, k) for k in fields)])

    settings = (
        f"{args.workers} workers × {args.threads} threads per server, nginx `worker_processes {args.nginx_workers}`, "
        f"wrk {args.wrk_threads} threads, {args.connections} connections ({FILE_CONNECTIONS} for the file), "
        f"{args.rounds} round(s) × {args.duration} s per server and scenario, servers in turn "
        f"({' '.join(server_names(backends))}), medians across rounds."
    )
    md = [
        "# ferrule benchmark",
        "",
        "Generated by `benches/run`" + (" --quick" if args.quick else "") + ". " + settings,
        "",
        (
            "CPU is the user+system time of the server's whole process tree (master and workers) during the run, "
            "divided by the requests served; nginx's own CPU is shown apart. RSS and PSS are per worker process: "
            "idle after start-up, and the peak of the workers' mean during the load (PSS splits pages shared "
            "after fork between the processes that share them)."
        ),
        "",
        results_tables(rows, backends, args, notes),
        "",
        "### How each server runs",
        "",
        *[f"- {note}" for note in SETUP_NOTES + ([TLS_NOTE] if any(sc.tls for sc in SCENARIOS) else [])],
        "",
        "### Machine and versions",
        "",
        md_table(["", ""], [[k, v] for k, v in machine_info(args, backends)], numeric=False),
    ]
    try:
        draw_chart(out / "latest.png", rows, backends)
    except Exception as e:  # noqa: BLE001  (a missing or broken matplotlib must not lose the numbers)
        problems.append(f"chart not drawn: {e}")
    if problems:
        md += ["", "### Problems", ""] + [f"- {p}" for p in problems]
    text = "\n".join(md) + "\n"
    (out / "latest.md").write_text(text)
    return text


def draw_chart(path: Path, rows: list[dict], backends: list[Backend]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scenarios = [sc.name for sc in SCENARIOS if any(r["scenario"] == sc.name for r in rows)]
    peers = [n for n in server_names(backends) if n not in ("ferrule", "nginx")]
    servers = [n for n in server_names(backends) if n != "nginx"]
    ceiling_scenarios = [s for s in scenarios if any(r["scenario"] == s and r["server"] == "nginx" for r in rows)]

    def value(scenario, server, key):
        r = next((x for x in rows if x["scenario"] == scenario and x["server"] == server), None)
        return (r or {}).get(key) or 0.0

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(scenarios), 1)
    for i, sc in enumerate(scenarios):
        xs = [p + (i - (len(scenarios) - 1) / 2) * width for p in range(len(peers))]
        ax1.bar(xs, [value(sc, p, "ferrule_over_rps") for p in peers], width, label=sc)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    # Ratios on a log scale, so that twice as fast and half as fast are the same distance from 1.
    ax1.set_yscale("log", base=2)
    ratios = [value(sc, p, "ferrule_over_rps") for sc in scenarios for p in peers]
    lo, hi = min([1.0, *[r for r in ratios if r > 0]]), max([1.0, *ratios])
    ax1.set_ylim(lo / 1.15, hi * 1.15)
    ax1.set_yticks(
        [t for t in (0.125, 0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 8, 16) if lo / 1.15 <= t <= hi * 1.15]
    )
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xticks(range(len(peers)), [f"vs {p}" for p in peers])
    ax1.set_ylabel("ferrule req/s ÷ peer req/s (above 1: ferrule faster)")
    ax1.set_title("ferrule's throughput relative to each peer")
    ax1.legend(fontsize=8, ncol=2)

    width = 0.8 / max(len(servers), 1)
    for i, s in enumerate(servers):
        xs = [p + (i - (len(servers) - 1) / 2) * width for p in range(len(ceiling_scenarios))]
        ax2.bar(xs, [value(sc, s, "of_ceiling") for sc in ceiling_scenarios], width, label=s)
    ax2.set_xticks(range(len(ceiling_scenarios)), ceiling_scenarios)
    ax2.set_ylabel("fraction of nginx answering itself")
    ax2.set_title("Throughput as a fraction of the nginx ceiling")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default 2)")
    p.add_argument("--threads", type=int, default=4, help="app threads per worker (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument(
        "--warmup", type=int, default=2, help="seconds of unrecorded load per server and scenario (default 2)"
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32; the file scenario uses 4)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--nginx-workers", default="auto", help="nginx worker_processes (default auto)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s, 1 s warm-up")
    names = ",".join(s.name for s in SCENARIOS)
    p.add_argument("--scenarios", default=names, help=f"comma-separated subset of {names} (default: all)")
    p.add_argument("--servers", default="ferrule,uwsgi,gunicorn,granian", help="comma-separated subset")
    p.add_argument("--ferrule", help="the ferrule command (default: VENV/bin/ferrule, where benches/run installs it)")
    p.add_argument("--venv", default=sys.prefix, help="venv with the peers (default: the one running this)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary")
    p.add_argument("--out", default=str(BENCHES / "results"), help="results folder (default benches/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    args.servers = [s for s in args.servers.split(",") if s]
    # The servers change directory before they read their options' paths.
    args.venv = os.path.abspath(args.venv)
    args.ferrule = os.path.abspath(args.ferrule or os.path.join(args.venv, "bin", "ferrule"))
    wanted = [s for s in args.scenarios.split(",") if s]
    unknown = set(wanted) - {s.name for s in SCENARIOS}
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    SCENARIOS[:] = [s for s in SCENARIOS if s.name in wanted]
    if not 1 <= args.workers <= 64 or not 1 <= args.threads <= 256:
        p.error("workers must be 1..64 and threads 1..256")
    return args


def prepare_data(tmp: Path) -> Expected:
    (tmp / "bytes64k.bin").write_bytes(bench_app.BYTES_64K)
    crc = 0
    with open(tmp / "file.bin", "wb") as f:
        left = FILE_SIZE
        while left:
            block = os.urandom(min(left, 1 << 20))
            crc = zlib.crc32(block, crc)
            f.write(block)
            left -= len(block)
    post_body = bytes((i * 31 + 7) & 0xFF for i in range(4096)) * (POST_SIZE // 4096)
    (tmp / "post.bin").write_bytes(post_body)
    # wrk sends this body with every request; Lua's long brackets need no escaping for a temp path.
    (tmp / "post.lua").write_text(
        "-- 1 MiB POST for the echo scenario (generated by benches/bench.py)\n"
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'local f = assert(io.open([[{tmp / "post.bin"}]], "rb"))\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
    )
    return Expected(post_body=post_body, file_crc=crc)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    tls_names = [sc.name for sc in SCENARIOS if sc.tls]
    for tool, path in (("nginx", args.nginx), ("wrk", args.wrk)) + ((("openssl", "openssl"),) if tls_names else ()):
        if not shutil.which(path):
            why = f" (deploy/make-certs needs it for {', '.join(tls_names)})" if tool == "openssl" else ""
            print(f"error: {tool} not found ({path}){why}; install it with apt-get", file=sys.stderr)
            return 2
    if not os.access(args.ferrule, os.X_OK):
        print(
            f"error: no ferrule command at {args.ferrule}; install ferrule into the venv "
            f"(benches/run does: deploy/install-checkout {args.venv})",
            file=sys.stderr,
        )
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="ferrule-bench-"))
    backends = build_backends(args, tmp)
    nginx_proc = None
    problems: list[str] = []
    # Lines the report shows under a scenario's table (who did not take part, TLS handshakes).
    notes: dict[str, list[str]] = {}
    runs: list[Run] = []
    started = time.monotonic()
    try:
        print(f"temp dir {tmp}", file=sys.stderr)
        expected = prepare_data(tmp)
        env = dict(os.environ, BENCH_FILE=str(tmp / "file.bin"), PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(args.venv) / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)
        certs = make_certs(tmp) if any(b.tls for b in backends) else None

        for b in backends:
            if b.protocol != "nginx" and not os.access(b.command[0], os.X_OK):
                b.status = "not installed"
                b.version = "–"
                problems.append(f"{b.name}: not installed ({b.command[0]} missing); left out")
                continue
            b.version = version_of(b, args)
            if b.protocol == "nginx":
                continue
            b.log_path = tmp / f"{b.prefix}.log"
            b.proc = start_process(b.command, b.log_path, env)

        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_config(args, tmp, port, [b for b in backends if b.status == "ok"]))
        nginx_cmd = [args.nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)]
        test = subprocess.run(nginx_cmd + ["-t"], check=False, capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected the generated config:\n{test.stderr}")
        nginx_proc = start_process(nginx_cmd, tmp / "nginx.log", env)

        for b in backends:
            if b.protocol == "nginx" or b.status != "ok":
                continue
            try:
                wait_ready(b, port, args.workers)
            except RuntimeError as e:
                b.status = "failed to start"
                problems.append(f"{b.name}: failed to start: {e}")
                stop_group(b.proc)
                b.proc = None
                continue
            time.sleep(1)  # let start-up garbage settle before the idle reading
            b.idle_rss_mib = mean_per_worker(b.proc.pid, rss_mib)
            b.idle_pss_mib = mean_per_worker(b.proc.pid, pss_mib)
            print(f"{b.prefix} {b.version} ready: {fmt(b.idle_rss_mib)} MiB RSS per idle worker", file=sys.stderr)
            if b.tls:
                b.tls_seen = tls_resumption(b, certs)
                print(f"  {b.prefix}: {b.tls_seen}", file=sys.stderr)
        active = [b for b in backends if b.status == "ok"]

        for sc in SCENARIOS:
            order = [b for b in active if b.serves(sc) and (b.protocol != "nginx" or sc.ceiling)]
            if sc.tls:
                # Said the way a server that is not installed is: named, with the reason, and no numbers.
                absent = [f"{n} ({NO_TLS[n]})" for n in args.servers if n in NO_TLS]
                if absent:
                    notes.setdefault(sc.name, []).append(f"Not in this scenario: {', '.join(absent)}.")
                    print(f"  {sc.name}: not measured for {', '.join(absent)}", file=sys.stderr)
                for b in order:
                    if b.tls_seen:
                        notes.setdefault(sc.name, []).append(f"{b.name}: {b.tls_seen}.")
            good = []
            for b in order:
                wrong = check_answer(port, b, sc, expected)
                if wrong:
                    problems.append(f"{sc.name} on {b.name}: wrong answer ({wrong}); not measured")
                    print(f"  {sc.name} on {b.name}: WRONG ANSWER ({wrong})", file=sys.stderr)
                else:
                    good.append(b)
            if args.warmup:
                for b in good:
                    if revive(b, args, port, env, tmp, problems):
                        run_wrk(wrk_command(args, port, b, sc, args.warmup, tmp), args.warmup)
            for rnd in range(1, args.rounds + 1):
                for b in good:
                    r = None
                    # A server that dies during a run is restarted once and the run repeated: the run's
                    # numbers (mostly 502s from nginx) say nothing about the server.
                    for _ in range(2):
                        if not revive(b, args, port, env, tmp, problems):
                            break
                        r = measure(args, port, b, nginx_proc, sc, rnd, tmp)
                        if b.proc is None or b.proc.poll() is None:
                            break
                        r = None
                    if r is None:
                        continue
                    runs.append(r)
                    print(
                        f"  {sc.name:9} round {rnd} {b.name:9} {r.rps:>10,.0f} req/s  p50 {fmt(r.p50_ms, 2):>7} ms  "
                        f"p99 {fmt(r.p99_ms, 2):>7} ms  failed {r.failed}  cpu {fmt(r.cpu_us_per_req, 0)} µs/req",
                        file=sys.stderr,
                    )
            if sc.tls and any(b.name == "ferrule" for b in good):
                time.sleep(1.5)  # ferrule's workers report their counters to its master every second
                counted = ferrule_handshakes(port)
                if counted:
                    notes.setdefault(sc.name, []).append(
                        f"ferrule's TLS handshakes with nginx, from the answer checks to the last round: {counted}."
                    )
                    print(f"  {sc.name}: ferrule's TLS handshakes: {counted}", file=sys.stderr)
    except (KeyboardInterrupt, Interrupted) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        problems.append(f"interrupted ({why}); results are partial")
        print("\ninterrupted; stopping the servers", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (report what was measured so far, then fail)
        problems.append(f"run aborted: {e}")
        print(f"error: {e}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for b in backends:
            stop_group(b.proc)
        stop_group(nginx_proc)
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = summarise(runs, backends)
    if rows:
        text = write_outputs(args, rows, runs, backends, problems, notes)
        print(text)
        print(
            f"wrote {args.out}/latest.{{md,csv,png}} and latest-runs.csv in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    aborted = any(p.startswith(("run aborted", "interrupted")) for p in problems)
    # A peer that could not run is reported and skipped; ferrule itself not running fails the benchmark (either
    # instance: the Unix-socket one or the TLS one).
    scenario_of = {sc.name: sc for sc in SCENARIOS}

    def measured(b: Backend) -> bool:
        return any(r.server == b.name and b.serves(scenario_of[r.scenario]) for r in runs)

    ferrule_ok = all(b.restarts == 0 and measured(b) for b in backends if b.name == "ferrule")
    return 1 if aborted or not runs or not ferrule_ok else 0


if __name__ == "__main__":
    sys.exit(main())

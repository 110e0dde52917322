"""The servers under test behind one nginx: who they are (a Unix-socket instance each, a TLS instance for the TLS
scenario), the nginx.conf that reaches them, waiting until they are ready, and restarting one that died."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.nginx import free_port, nginx_conf_text, request, uwsgi_params
from harness.processes import log_tail, read_log, start_process, stop_group
from harness.procfs import workers_of
from harness.servers import ferrule_command, granian_command, gunicorn_command, uwsgi_command
from harness.versions import ferrule_version, nginx_version, package_version, uwsgi_version

from .scenarios import SCENARIOS, Scenario

APP = "bench_app:application"
# Bound on a start-up, so a hung server fails the run instead of hanging it.
START_TIMEOUT = 60.0
# A server that dies during the run is restarted this many times before it is left out.
MAX_RESTARTS = 2


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


def build_backends(args: argparse.Namespace, tmp: Path, threads: int) -> list[Backend]:
    """The servers of one thread count (each thread count of a run has its own instances)."""
    w, t, venv = args.workers, threads, args.venv
    # --request-logs: ferrule's access log against uWSGI's default per-request log lines.
    request_logs = getattr(args, "request_logs", False)
    ferrule_extra = ["--access-log"] if request_logs else []
    backends = [
        Backend(
            "ferrule",
            "uwsgi",
            ferrule_command(
                args.ferrule, ["--socket", f"unix:{tmp / 'ferrule.sock'}"], w, t, venv, APP, ferrule_extra
            ),
            tmp / "ferrule.sock",
            ready_log=rf"ready workers={args.workers}\b",
        ),
        Backend(
            "uwsgi",
            "uwsgi",
            uwsgi_command(venv, ["--socket", str(tmp / "uwsgi.sock")], w, t, APP, request_logs=request_logs),
            tmp / "uwsgi.sock",
        ),
        Backend(
            "gunicorn",
            "uwsgi",
            gunicorn_command(venv, f"unix:{tmp / 'gunicorn.sock'}", w, t, APP),
            tmp / "gunicorn.sock",
        ),
        Backend("granian", "http", granian_command(venv, tmp / "granian.sock", w, t, APP), tmp / "granian.sock"),
    ]
    wanted = set(args.servers)
    chosen = [b for b in backends if b.name in wanted] if any(not sc.tls for sc in SCENARIOS) else []
    if any(sc.tls for sc in SCENARIOS):
        chosen += [b for b in tls_backends(args, tmp, threads) if b.name in wanted]
    return chosen + [Backend("nginx", "nginx")]


def tls_backends(args: argparse.Namespace, tmp: Path, threads: int) -> list[Backend]:
    """The TLS instances: the same servers with the same settings, each on a TLS port of 127.0.0.1, with the
    certificate and key that make_certs writes into tmp/tls."""
    w, t, venv = args.workers, threads, args.venv
    cert, key = tmp / "tls" / "ferrule.crt", tmp / "tls" / "ferrule.key"
    ferrule_port, uwsgi_port = free_port(), free_port()
    ferrule_socket = [
        "--socket", f"tls://127.0.0.1:{ferrule_port}",
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        # Only to read its TLS handshake counters (full, resumed) through nginx after the scenario.
        "--metrics", f"unix:{tmp / 'ferrule-tls-metrics.sock'}",
    ]  # fmt: skip
    return [
        Backend(
            "ferrule",
            "uwsgi",
            ferrule_command(args.ferrule, ferrule_socket, w, t, venv, APP),
            tls_port=ferrule_port,
            ready_log=rf"ready workers={args.workers}\b",
        ),
        Backend(
            "uwsgi",
            "uwsgi",
            uwsgi_command(venv, ["--ssl-socket", f"127.0.0.1:{uwsgi_port},{cert},{key}"], w, t, APP),
            tls_port=uwsgi_port,
        ),
    ]


def version_of(backend: Backend, args: argparse.Namespace) -> str:
    try:
        if backend.name == "ferrule":
            return ferrule_version(args.ferrule)
        if backend.name == "uwsgi":
            return uwsgi_version(backend.command[0])
        if backend.name in ("gunicorn", "granian"):
            return package_version(args.venv, backend.name)
        if backend.name == "nginx":
            return nginx_version(args.nginx)
    except OSError:
        pass
    return "?"


def _tls_locations(b: Backend, tmp: Path, params: str) -> list[str]:
    locations = [
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
    ]
    if b.name == "ferrule":
        locations.append(
            f"""        location = /{b.prefix}/metrics {{
{params}
            uwsgi_pass unix:{tmp / "ferrule-tls-metrics.sock"};
        }}"""
        )
    return locations


def _backend_blocks(b: Backend, tmp: Path, params: str) -> tuple[list[str], list[str]]:
    """The upstream and location blocks that reach one server (none for the ceiling)."""
    if b.protocol == "uwsgi" and b.tls:
        upstream = f"    upstream {b.prefix} {{\n        server 127.0.0.1:{b.tls_port};\n    }}"
        return [upstream], _tls_locations(b, tmp, params)
    if b.protocol == "uwsgi":
        # The uwsgi protocol ends a response by closing the connection: no keepalive pool is possible.
        upstream = f"    upstream {b.name} {{\n        server unix:{b.socket};\n    }}"
        location = f"""        location /{b.name}/ {{
            # The app sees PATH_INFO without the server's prefix, as it would at the root of a site.
            rewrite ^/{b.name}(/.*)$ $1 break;
{params}
            uwsgi_pass {b.name};
        }}"""
        return [upstream], [location]
    if b.protocol == "http":
        upstream = f"    upstream {b.name} {{\n        server unix:{b.socket};\n        keepalive 32;\n    }}"
        location = f"""        location /{b.name}/ {{
            proxy_pass http://{b.name}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}"""
        return [upstream], [location]
    return [], []


def nginx_config(args: argparse.Namespace, tmp: Path, port: int, backends: list[Backend]) -> str:
    params = uwsgi_params()
    upstreams, locations = [], []
    for b in backends:
        ups, locs = _backend_blocks(b, tmp, params)
        upstreams += ups
        locations += locs
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
    return nginx_conf_text("benches/bench.py", args.nginx_workers, 4096, tmp, port, http_settings, upstreams, locations)


def wait_ready(backend: Backend, port: int, workers: int) -> None:
    """Waits until the server answers through nginx and all its workers exist; raises RuntimeError if not."""
    deadline = time.monotonic() + START_TIMEOUT
    ready_re = re.compile(backend.ready_log) if backend.ready_log else None
    last = "no answer yet"
    while time.monotonic() < deadline:
        if backend.proc.poll() is not None:
            raise RuntimeError(f"exited with status {backend.proc.returncode}: {log_tail(backend.log_path)}")
        if ready_re is not None and not ready_re.search(read_log(backend.log_path)):
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

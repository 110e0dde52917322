"""ferrule's memory benchmark: a Django site under each server, its whole process tree's memory measured.

Run it through `benches/memory`, which prepares the venv this script runs from (as `benches/run` does for
bench.py): the peers, Django and Django REST framework, and ferrule pip-installed from this checkout.

The site is benches/apps/djsite (admin, auth, contenttypes, sessions, messages, staticfiles, rest_framework and
a `books` app; sqlite with 100 books in a temp dir, made by `python -m djsite.prepare` before any server starts).
Three endpoints are driven: the admin's changelist of the books (logged in with a session cookie), a DRF list of
all the books as JSON, and a template page with a loop. Every answer carries X-Worker-Pid.

One nginx (generated config in the temp dir, written as for bench.py) has one location per server, each passed to a
Unix socket with uwsgi_pass:

    /ferrule/           ferrule --workers N --threads T
    /ferrule-preload/   ferrule --preload --workers N --threads T
    /uwsgi/             uwsgi --master --processes N --threads T   (imports in the master, then forks)
    /uwsgi-lazy-apps/   the same with --lazy-apps                  (each worker imports after the fork)
    /gunicorn/          gunicorn --protocol uwsgi --worker-class gthread --workers N --threads T
    /gunicorn-preload/  the same with --preload

One server runs at a time. For each N of --workers and each server: start it and time the first 200 answer
through nginx (polled every 10 ms from the moment the command is launched); drive the three endpoints in turn
from a few keep-alive connections until every worker pid has answered every endpoint (bounded by --cover-limit
requests); measure ("warm"); go on to --requests requests in total; measure again ("after"); stop it (SIGTERM,
then SIGKILL to its process group after a bound).

A measurement covers the launched process and all its descendants (/proc/*/stat ppid): total PSS is the sum of
`Pss:` in /proc/PID/smaps_rollup over the tree; per worker (the pids seen in X-Worker-Pid) the mean of
Private_Clean + Private_Dirty, and the mean RSS.

Outputs: a table on stdout, and memory.md and memory.csv in the results folder (--out, default benches/results).

The machinery it shares with bench.py (processes, /proc, server command lines, nginx, reports) is in benches/harness.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import APPS, BENCHES
from harness.nginx import REQUEST_TIMEOUT, free_port, nginx_conf_text, start_nginx, uwsgi_params
from harness.processes import (
    Interrupted,
    catch_stop_signals,
    ignore_stop_signals,
    log_head,
    log_tail,
    server_env,
    start_process,
    stop_group,
    stop_server,
)
from harness.procfs import Memory, measure_memory, process_tree
from harness.report import csv_value, fmt, md_table
from harness.servers import ferrule_command, gunicorn_command, uwsgi_command
from harness.versions import ferrule_version, machine_rows, nginx_version, package_version, uwsgi_version

sys.path.insert(0, str(APPS))
# The endpoints, and what their answers must contain: the same table the data step checks them with.
from djsite.prepare import ENDPOINTS  # noqa: E402

APP = "djsite.wsgi:application"
# Bounds on waits, so a hung server fails its row instead of hanging the run.
START_TIMEOUT = 120.0
POLL_INTERVAL = 0.010
# A server whose answers keep failing is given up after this many failed requests.
MAX_FAILURES = 50


# ---------------------------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    name: str  # also the nginx location prefix and upstream name
    kind: str  # "ferrule", "uwsgi" or "gunicorn": which version to report
    extra: list[str] = field(default_factory=list)  # the variant's own options

    def socket(self, tmp: Path) -> Path:
        return tmp / f"{self.name}.sock"

    def command(self, args: argparse.Namespace, tmp: Path, workers: int) -> list[str]:
        sock, t, venv = self.socket(tmp), args.threads, args.venv
        if self.kind == "ferrule":
            return ferrule_command(args.ferrule, ["--socket", f"unix:{sock}"], workers, t, venv, APP, self.extra)
        if self.kind == "uwsgi":
            return uwsgi_command(venv, ["--socket", str(sock)], workers, t, APP, self.extra)
        return gunicorn_command(venv, f"unix:{sock}", workers, t, APP, self.extra)


SERVERS = [
    Server("ferrule", "ferrule"),
    Server("ferrule-preload", "ferrule", ["--preload"]),
    Server("uwsgi", "uwsgi"),
    Server("uwsgi-lazy-apps", "uwsgi", ["--lazy-apps"]),
    Server("gunicorn", "gunicorn"),
    Server("gunicorn-preload", "gunicorn", ["--preload"]),
]

SETUP_NOTES = [
    (
        "Every server loads `benches/apps/djsite` (`djsite.wsgi:application`) from the same venv, listens on a Unix "
        "socket and is reached by one nginx with `uwsgi_pass` (gunicorn with `--protocol uwsgi`); one server runs "
        "at a time."
    ),
    "ferrule: `--workers N --threads T`; ferrule-preload adds `--preload`.",
    (
        "uWSGI: `--master --processes N --threads T --need-app --die-on-term --disable-logging` (by default it "
        "imports the app in the master and forks the workers from it); uwsgi-lazy-apps adds `--lazy-apps`."
    ),
    (
        "gunicorn: `--protocol uwsgi --worker-class gthread --workers N --threads T --keep-alive 0 "
        "--no-control-socket`; gunicorn-preload adds `--preload`."
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# nginx


def nginx_config(args: argparse.Namespace, tmp: Path, port: int, servers: list[Server]) -> str:
    params = uwsgi_params()
    upstreams, locations = [], []
    for s in servers:
        # One server per upstream: nginx never marks it down, so the start-up probe sees the first answer at once.
        upstreams.append(f"    upstream {s.name} {{\n        server unix:{s.socket(tmp)} max_fails=0;\n    }}")
        locations.append(
            f"""        location /{s.name}/ {{
            # The site sees PATH_INFO without the server's prefix, as it would at the root of a domain.
            rewrite ^/{s.name}(/.*)$ $1 break;
{params}
            uwsgi_pass {s.name};
        }}"""
        )
    return nginx_conf_text(
        "benches/memory.py",
        args.nginx_workers,
        1024,
        tmp,
        port,
        "    keepalive_requests 1000000;",
        upstreams,
        locations,
    )


# ---------------------------------------------------------------------------------------------------------------
# The driver: a few threads, each with a keep-alive connection to nginx, cycling the endpoints


class Driver:
    def __init__(self, port: int, server: Server, cookie: str, connections: int, proc: subprocess.Popen):
        self.port, self.server, self.cookie, self.connections, self.proc = port, server, cookie, connections, proc
        self.lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.failed = 0
        self.errors: list[str] = []
        # pid -> the endpoints it has answered
        self.seen: dict[int, set[str]] = {}
        # pid -> how many answers it gave
        self.answers: dict[int, int] = {}
        self.per_endpoint = dict.fromkeys(ENDPOINTS, 0)
        self._orders = [random.Random(i) for i in range(connections)]
        self._conns: list[http.client.HTTPConnection | None] = [None] * connections

    def covered(self, workers: int) -> bool:
        """Whether at least `workers` pids have answered, and each of them every endpoint."""
        return len(self.seen) >= workers and all(len(eps) == len(ENDPOINTS) for eps in self.seen.values())

    def drive(self, until, limit: int) -> None:
        """Sends requests until until() is true (checked under the lock) or `limit` requests were sent in all."""
        stop = threading.Event()

        def take() -> bool:
            with self.lock:
                if stop.is_set() or self.sent >= limit or until() or self.failed >= MAX_FAILURES:
                    return False
                self.sent += 1
                return True

        def loop(i: int) -> None:
            rng = self._orders[i]
            names = list(ENDPOINTS)
            while True:
                # Each round of the endpoints in a fresh order, so that no worker is handed one endpoint only.
                rng.shuffle(names)
                for name in names:
                    if not take():
                        return
                    self._one(i, name)

        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(self.connections)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if self.proc.poll() is not None:
                stop.set()
            for t in threads:
                t.join(timeout=0.1)

    def _one(self, i: int, name: str) -> None:
        path, marker, count = ENDPOINTS[name]
        headers = {"Cookie": self.cookie, "Accept": "application/json" if name == "api" else "text/html"}
        why = None
        pid = None
        try:
            conn = self._conns[i]
            if conn is None:
                conn = self._conns[i] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            conn.request("GET", f"/{self.server.name}{path}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            raw_pid = resp.getheader("X-Worker-Pid")
            if resp.status != 200:
                why = f"{name}: HTTP {resp.status} {body[:120]!r}"
            elif body.count(marker) != count:
                why = f"{name}: {body.count(marker)} x {marker!r}, want {count}"
            elif not raw_pid or not raw_pid.isdigit():
                why = f"{name}: no X-Worker-Pid"
            else:
                pid = int(raw_pid)
            if resp.will_close:
                conn.close()
                self._conns[i] = None
        except (OSError, http.client.HTTPException) as e:
            why = f"{name}: {type(e).__name__}: {e}"
            if self._conns[i] is not None:
                self._conns[i].close()
                self._conns[i] = None
        with self.lock:
            if why is None:
                self.answered += 1
                self.per_endpoint[name] += 1
                self.seen.setdefault(pid, set()).add(name)
                self.answers[pid] = self.answers.get(pid, 0) + 1
            else:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(why)

    def close(self) -> None:
        for c in self._conns:
            if c is not None:
                c.close()


# ---------------------------------------------------------------------------------------------------------------
# One server at one worker count


@dataclass
class Row:
    server: str
    workers: int
    status: str = "ok"  # or what went wrong
    startup_s: float | None = None
    requests_warm: int | None = None  # requests sent when every worker had answered every endpoint
    covered: bool = False
    requests: int | None = None  # requests sent in all (the "after" measurement)
    failed: int = 0
    pids_seen: int | None = None
    # The fewest and most answers one worker gave, of the `requests`: how evenly the server spreads the load.
    answers_min: int | None = None
    answers_max: int | None = None
    processes: int | None = None
    total_pss_warm_mib: float | None = None
    total_pss_after_mib: float | None = None
    private_warm_mib: float | None = None
    private_after_mib: float | None = None
    rss_warm_mib: float | None = None
    rss_after_mib: float | None = None
    worker_pss_after_mib: float | None = None
    other_pss_after_mib: float | None = None
    stop_s: float | None = None
    seconds: float | None = None  # wall time of the whole row


def wait_first_answer(proc: subprocess.Popen, port: int, server: Server, started: float) -> float:
    """Seconds from `started` (the launch) to the first 200 through nginx; raises RuntimeError if none."""
    path = f"/{server.name}{ENDPOINTS['page'][0]}"
    last = "no answer yet"
    while time.monotonic() - started < START_TIMEOUT:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return time.monotonic() - started
            last = f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException) as e:
            last = str(e)
        finally:
            conn.close()
        time.sleep(POLL_INTERVAL)
    raise RuntimeError(f"no answer after {START_TIMEOUT:.0f} s ({last})")


def record_memory(row: Row, warm: Memory, after: Memory) -> None:
    row.processes = after.processes
    row.total_pss_warm_mib, row.total_pss_after_mib = warm.total_pss_mib, after.total_pss_mib
    row.private_warm_mib, row.private_after_mib = warm.private_mib, after.private_mib
    row.rss_warm_mib, row.rss_after_mib = warm.rss_mib, after.rss_mib
    row.worker_pss_after_mib, row.other_pss_after_mib = after.worker_pss_mib, after.other_pss_mib


def measured_line(row: Row, warm: Memory, after: Memory) -> str:
    """The progress line of a measured row."""
    return (
        f"warm at {row.requests_warm} requests"
        f"{'' if row.covered else ' (NOT every worker x endpoint)'}: total PSS {fmt(warm.total_pss_mib)} MiB, "
        f"private/worker {fmt(warm.private_mib)} MiB; after {row.requests}: total PSS "
        f"{fmt(after.total_pss_mib)} MiB, private/worker {fmt(after.private_mib)} MiB, RSS/worker "
        f"{fmt(after.rss_mib)} MiB, {after.processes} processes, {row.failed} failed, answers per worker "
        f"{row.answers_min}-{row.answers_max}"
    )


def run_one(args, tmp: Path, port: int, server: Server, workers: int, cookie: str, env, problems) -> Row:
    row = Row(server.name, workers)
    t_row = time.monotonic()
    sock = server.socket(tmp)
    sock.unlink(missing_ok=True)
    log_path = tmp / f"{server.name}-w{workers}.log"
    cmd = server.command(args, tmp, workers)
    started = time.monotonic()
    proc = start_process(cmd, log_path, env)
    tree: list[int] = [proc.pid]
    try:
        try:
            row.startup_s = wait_first_answer(proc, port, server, started)
        except RuntimeError as e:
            row.status = "failed to start"
            problems.append(f"{server.name} (w={workers}): failed to start: {e}: {log_head(log_path)}")
            print(f"  {server.name} w={workers}: FAILED TO START: {e}: {log_head(log_path)}", file=sys.stderr)
            return row
        print(f"  {server.name} w={workers}: first answer after {row.startup_s:.2f} s", file=sys.stderr)

        driver = Driver(port, server, cookie, args.connections, proc)
        try:
            driver.drive(lambda: driver.covered(workers), args.cover_limit)
            row.covered = driver.covered(workers)
            row.requests_warm = driver.sent
            tree = process_tree(proc.pid)
            warm = measure_memory(proc.pid, set(driver.seen))
            if not row.covered:
                problems.append(
                    f"{server.name} (w={workers}): after {driver.sent} requests, {len(driver.seen)} pids had "
                    f"answered, not every one of {workers} workers every endpoint; 'warm' measured there"
                )
            driver.drive(lambda: False, args.requests)
            tree = process_tree(proc.pid)
            after = measure_memory(proc.pid, set(driver.seen))
        finally:
            driver.close()
        row.requests, row.failed, row.pids_seen = driver.sent, driver.failed, len(driver.seen)
        if driver.answers:
            row.answers_min, row.answers_max = min(driver.answers.values()), max(driver.answers.values())
        if driver.failed:
            problems.append(f"{server.name} (w={workers}): {driver.failed} failed requests, e.g. {driver.errors}")
        if proc.poll() is not None:
            row.status = f"exited (status {proc.returncode})"
            problems.append(f"{server.name} (w={workers}): exited during the run: {log_tail(log_path)}")
        elif driver.failed >= MAX_FAILURES:
            row.status = "failing"
        record_memory(row, warm, after)
        print(f"  {server.name} w={workers}: {measured_line(row, warm, after)}", file=sys.stderr)
    finally:
        tree = sorted(set(tree) | set(process_tree(proc.pid)))
        row.stop_s, problem = stop_server(proc, tree)
        if problem:
            problems.append(f"{server.name} (w={workers}): {problem}")
            print(f"  {server.name} w={workers}: {problem}", file=sys.stderr)
        row.seconds = time.monotonic() - t_row
    return row


# ---------------------------------------------------------------------------------------------------------------
# Output


CSV_FIELDS = list(Row.__dataclass_fields__)


def versions(args, servers: list[Server]) -> list[tuple[str, str]]:
    kinds = {s.kind for s in servers}
    out = machine_rows(args.venv) + [
        ("django", package_version(args.venv, "django")),
        ("djangorestframework", package_version(args.venv, "djangorestframework")),
    ]
    if "ferrule" in kinds:
        out.append(("ferrule", ferrule_version(args.ferrule)))
    if "uwsgi" in kinds:
        out.append(("uwsgi", uwsgi_version(Path(args.venv) / "bin" / "uwsgi")))
    if "gunicorn" in kinds:
        out.append(("gunicorn", package_version(args.venv, "gunicorn")))
    out.append(("nginx", nginx_version(args.nginx)))
    return out


def ratio_lines(rows: list[Row]) -> list[list[str]]:
    """ferrule --preload against its targets, at each worker count measured."""
    ok = {(r.server, r.workers): r for r in rows if r.status == "ok"}
    checks = [
        # (what, numerator server, denominator server, metric, target, worker count the target is set at)
        ("total PSS after", "ferrule-preload", "uwsgi", "total_pss_after_mib", 1.0, 4),
        ("total PSS after", "ferrule-preload", "ferrule", "total_pss_after_mib", 0.75, 8),
        ("start-up to first answer", "ferrule-preload", "uwsgi", "startup_s", 1.0, 4),
        ("total PSS after", "ferrule", "uwsgi", "total_pss_after_mib", None, None),
        ("total PSS after", "ferrule-preload", "gunicorn-preload", "total_pss_after_mib", None, None),
        ("private per worker after", "ferrule-preload", "uwsgi", "private_after_mib", None, None),
    ]
    out = []
    for w in sorted({r.workers for r in rows}):
        for what, num, den, metric, target, target_w in checks:
            a, b = ok.get((num, w)), ok.get((den, w))
            va, vb = (getattr(a, metric) if a else None), (getattr(b, metric) if b else None)
            value = va / vb if va is not None and vb else None
            if target is not None and target_w == w:
                goal = f"≤ {target:.2f}×"
                verdict = "–" if value is None else ("met" if value <= target else "missed")
            else:
                goal, verdict = "", ""
            out.append(
                [f"{what}, {w} workers", f"{num} / {den}", "–" if value is None else f"{value:.2f}×", goal, verdict]
            )
    return out


def write_outputs(args, rows: list[Row], servers: list[Server], problems: list[str], info) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(v) for k, v in asdict(r).items()})

    head = [
        "server", "workers", "start-up s", "total PSS warm MiB", "total PSS after MiB", "private/worker warm MiB",
        "private/worker after MiB", "RSS/worker MiB", "processes", "warm at req", "answers/worker", "failed",
    ]  # fmt: skip
    body = []
    for r in rows:
        if r.status != "ok" and r.total_pss_after_mib is None:
            body.append([r.server, str(r.workers), r.status] + ["–"] * (len(head) - 3))
            continue
        body.append(
            [
                r.server + ("" if r.status == "ok" else f" ({r.status})"),
                str(r.workers),
                fmt(r.startup_s, 2),
                fmt(r.total_pss_warm_mib),
                fmt(r.total_pss_after_mib),
                fmt(r.private_warm_mib),
                fmt(r.private_after_mib),
                fmt(r.rss_after_mib),
                str(r.processes),
                f"{r.requests_warm}" + ("" if r.covered else " (not covered)"),
                f"{r.answers_min}–{r.answers_max}" if r.answers_min is not None else "–",
                str(r.failed),
            ]
        )
    workers = ", ".join(str(w) for w in args.workers)
    md = [
        "# ferrule memory benchmark (Django site)",
        "",
        f"Generated by `benches/memory`{' --quick' if args.quick else ''}. {workers} workers × {args.threads} "
        f"threads per server; {args.connections} keep-alive connections to nginx cycle the admin changelist, the "
        f"DRF list and the template page; 'warm' is measured once every worker has answered every endpoint, "
        f"'after' at {args.requests} requests in all (or at 'warm at req' if that came later).",
        "",
        "Total PSS sums `Pss:` of /proc/PID/smaps_rollup over the server's whole process tree (master, workers, "
        "zygote); private/worker is the mean of Private_Clean + Private_Dirty over the processes that answered "
        "(X-Worker-Pid), RSS/worker their mean RSS. Start-up is from launching the command to the first 200 answer "
        "through nginx (polled every 10 ms). 'warm at req' is the request count at which every worker had answered "
        "every endpoint; 'answers/worker' the fewest and most requests one worker answered in all. PSS also "
        "splits the pages the tree shares with processes outside it (the Python binary and libraries this "
        "driver maps too): a few MiB at most, the same for every server.",
        "",
        md_table(head, body),
        "",
        "### Ratios",
        "",
        md_table(["", "servers", "ratio", "target", ""], ratio_lines(rows), numeric=False),
        "",
        "### How each server runs",
        "",
        *[f"- {n}" for n in SETUP_NOTES],
        "",
        "### Machine and versions",
        "",
        md_table(["", ""], [[k, v] for k, v in info], numeric=False),
    ]
    if problems:
        md += ["", "### Problems", ""] + [f"- {p}" for p in problems]
    text = "\n".join(md) + "\n"
    (out / "memory.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = ",".join(s.name for s in SERVERS)
    p.add_argument("--servers", default=names, help=f"comma-separated subset of {names}")
    p.add_argument("--workers", help="comma-separated worker counts (default 4,8; --quick: 2)")
    p.add_argument("--threads", type=int, default=4, help="app threads per worker (default 4)")
    p.add_argument("--requests", type=int, help="requests per server and worker count (default 3000; --quick: 300)")
    p.add_argument(
        "--cover-limit",
        type=int,
        help="requests after which 'every worker answered every endpoint' is given up (default 20000; --quick: 3000)",
    )
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    p.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 workers, 300 requests")
    p.add_argument(
        "--ferrule", help="the ferrule command (default: VENV/bin/ferrule, where benches/memory installs it)"
    )
    p.add_argument("--venv", default=sys.prefix, help="venv with the peers and Django (default: the one running this)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    p.add_argument("--out", default=str(BENCHES / "results"), help="results folder (default benches/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (database, configs, logs)")
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = "2" if args.quick else "4,8"
    if args.requests is None:
        args.requests = 300 if args.quick else 3000
    if args.cover_limit is None:
        args.cover_limit = 3000 if args.quick else 20000
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        p.error("--workers takes comma-separated numbers, e.g. 4,8")
    if not args.workers or not all(1 <= w <= 64 for w in args.workers) or not 1 <= args.threads <= 256:
        p.error("workers must be 1..64 and threads 1..256")
    wanted = [s for s in args.servers.split(",") if s]
    unknown = set(wanted) - {s.name for s in SERVERS}
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))} (known: {names})")
    args.servers = [s for s in SERVERS if s.name in wanted]
    args.venv = os.path.abspath(args.venv)
    args.ferrule = os.path.abspath(args.ferrule or os.path.join(args.venv, "bin", "ferrule"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    catch_stop_signals()
    if not shutil.which(args.nginx):
        print(f"error: nginx not found ({args.nginx}); install it with apt-get", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="ferrule-memory-"))
    problems: list[str] = []
    rows: list[Row] = []
    nginx_proc = None
    started = time.monotonic()
    info = versions(args, args.servers)
    try:
        print(f"temp dir {tmp}", file=sys.stderr)
        env = server_env(args.venv, DJSITE_DIR=str(tmp / "site"), DJANGO_SETTINGS_MODULE="djsite.settings")
        (tmp / "site").mkdir()

        print("preparing the site (migrate, 100 books, a session)", file=sys.stderr)
        prep = subprocess.run(
            [str(Path(args.venv) / "bin" / "python"), "-m", "djsite.prepare"],
            cwd=APPS,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if prep.returncode != 0:
            raise RuntimeError(f"the site's data step failed:\n{prep.stdout}{prep.stderr}")
        cookie = json.loads(prep.stdout.strip().splitlines()[-1])["cookie"]

        runnable = []
        for s in args.servers:
            exe = s.command(args, tmp, 1)[0]
            if os.access(exe, os.X_OK):
                runnable.append(s)
            else:
                problems.append(f"{s.name}: not installed ({exe} missing); left out")
                rows += [Row(s.name, w, status="not installed") for w in args.workers]

        port = free_port()
        nginx_proc = start_nginx(args.nginx, tmp, nginx_config(args, tmp, port, runnable), env)

        for w in args.workers:
            for s in runnable:
                rows.append(run_one(args, tmp, port, s, w, cookie, env, problems))
    except (KeyboardInterrupt, Interrupted) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        problems.append(f"interrupted ({why}); results are partial")
        print("\ninterrupted; stopping", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (report what was measured so far, then fail)
        problems.append(f"run aborted: {e}")
        print(f"error: {e}", file=sys.stderr)
    finally:
        ignore_stop_signals()
        stop_group(nginx_proc)
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    order = {s.name: i for i, s in enumerate(SERVERS)}
    rows.sort(key=lambda r: (r.workers, order[r.server]))
    text = write_outputs(args, rows, args.servers, problems, info)
    print(text)
    print(f"wrote {args.out}/memory.{{md,csv}} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    aborted = any(p.startswith(("run aborted", "interrupted")) for p in problems)
    # A peer that cannot run is reported and skipped; a ferrule row that did not run fails the benchmark.
    ferrule_failed = any(r.server.startswith("ferrule") and r.status != "ok" for r in rows)
    return 1 if aborted or not any(r.status == "ok" for r in rows) or ferrule_failed else 0


if __name__ == "__main__":
    sys.exit(main())

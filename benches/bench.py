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
location in turn (A B C D A B C D ...) for several rounds per scenario; the tables report medians across rounds,
and ferrule's ratio to each peer pair by pair (a round's ferrule run against the same round's peer run) with the
median of those pair ratios. The whole run is repeated for each thread count of --threads (default 1,4), the
servers and nginx restarted for each; every output is grouped by thread count.

The flask and django scenarios run the same small view in each framework: a JSON document of the path, a header
wrk sends and the query string. The Django one is benches/apps/djsite's /django/json under the site's whole
middleware stack (sessions, CSRF, common, auth, messages...), mounted by bench_app; it reads neither session nor
user, and the servers run it without a database (DJSITE_DIR is an empty folder).

--per-worker sets the defaults of the per-worker method: one worker of ferrule and of uWSGI, each alone behind one
nginx worker, wrk -t1 -c16, 2 s of warm-up, 5 alternating pairs of 10 s on hello, flask and django at 1 and 4
threads, into per-worker.* instead of latest.* (--name); every option given explicitly still wins.

The TLS scenario (tls-hello) runs a second instance of each server that speaks uwsgi over TLS, on a TCP port of
127.0.0.1, with the same workers and threads, behind locations of the same nginx:

    /ferrule-tls/  uwsgi_pass suwsgi://  ferrule --socket tls://127.0.0.1:P --tls-cert C --tls-key K
    /uwsgi-tls/    uwsgi_pass suwsgi://  uwsgi --ssl-socket 127.0.0.1:P,C,K

with `uwsgi_ssl_session_reuse on` and `uwsgi_ssl_verify on` against a private CA that deploy/make-certs writes
into the temp dir. gunicorn (its uwsgi protocol has no TLS) and granian (HTTP only) do not take part.

Per server, thread count and scenario it records requests/s, p50 and p99 latency, failed requests (non-2xx plus
socket errors), CPU time per request (from /proc/<pid>/stat before and after each run) of the workers alone (the
tree minus the master's own utime+stime) and of the server's whole process tree, nginx's CPU time per request, and
resident memory per worker, at idle (after start-up, before any load) and at its peak under load.

Outputs: tables on stdout, and in the results folder NAME.csv (medians), NAME-runs.csv (every run), NAME.md
(tables, pair ratios, settings, machine, versions) and NAME.png (throughput ratios), NAME being latest unless
--name or --per-worker says otherwise; each has a threads column or a section per thread count.

This script holds the data the scenarios send, the answer checks and the run's loop; the scenarios, servers, runs
and report are in benches/load, the machinery it shares with memory.py in benches/harness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from harness import APPS, BENCHES
from harness.nginx import free_port, request, start_nginx
from harness.processes import (
    Interrupted,
    catch_stop_signals,
    ignore_stop_signals,
    server_env,
    start_process,
    stop_group,
)
from harness.procfs import mean_per_worker, pss_mib, rss_mib
from harness.report import fmt
from harness.tls import ferrule_handshakes, make_certs, tls_resumption
from harness.wrk import run_wrk
from load.report import write_outputs
from load.runs import Run, measure, summarise, wrk_command
from load.scenarios import FILE_SIZE, NO_TLS, POST_SIZE, SCENARIOS, Scenario
from load.servers import Backend, build_backends, nginx_config, revive, version_of, wait_ready

sys.path.insert(0, str(APPS))
# The app's constants are the reference answers, and the bytes nginx serves as the ceiling.
import bench_app  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The data the scenarios send and check


@dataclass
class Expected:
    post_body: bytes
    file_crc: int


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


def check_answer(port: int, backend: Backend, scenario: Scenario, expected: Expected) -> str | None:
    """Sends one request of the scenario and checks the answer; returns what is wrong, or None."""
    path = f"/{backend.prefix}{scenario.path}"
    body = expected.post_body if scenario.method == "POST" else None
    try:
        status, headers, got = request(port, path, scenario.method, body, headers=dict(scenario.headers))
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
    if name in ("flask", "django"):
        try:
            doc = json.loads(got)
        except ValueError:
            return f"not JSON: {got[:40]!r}"
        # The view's own path (nginx took the server's prefix off), the header and the query, as sent.
        view_path, _, query = scenario.path.partition("?")
        want = {"path": view_path, "client": dict(scenario.headers)["X-Bench-Client"], "query": dict(parse_qsl(query))}
        if doc != want:
            return f"JSON {doc!r}, want {want!r}"
    if name == "echo":
        want_crc = f"{zlib.crc32(expected.post_body):08x}"
        crc = {k.lower(): v for k, v in headers.items()}.get("x-body-crc32")
        if got != expected.post_body or crc != want_crc:
            return f"echo mismatch ({len(got)} bytes, crc {crc}, want {want_crc})"
    if name == "file" and (len(got) != FILE_SIZE or zlib.crc32(got) != expected.file_crc):
        return f"wrong {len(got)}-byte file"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Main


# `--per-worker`: the per-worker method (one worker alone behind one nginx worker, wrk -t1 -c16, ferrule against
# uWSGI in alternating pairs of 10 s, at 1 and 4 threads). Each value is only a default: an explicit option wins.
PER_WORKER = {
    "workers": 1,
    "threads": "1,4",
    "nginx_workers": "1",
    "wrk_threads": 1,
    "connections": 16,
    "warmup": 2,
    "rounds": 5,
    "duration": 10,
    "servers": "ferrule,uwsgi",
    "scenarios": "hello,flask,django",
    "name": "per-worker",
}


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of thread counts, e.g. 1,4") from None
    if not counts or not all(1 <= n <= 256 for n in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct thread counts of 1..256, e.g. 1,4")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benches/run --profile SCENARIO profiles one worker instead (benches/worker_profile.py; "
        "benches/run --profile hello --help lists its options).",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default 2)")
    p.add_argument(
        "--threads",
        type=thread_counts,
        default="1,4",
        help="app threads per worker, a comma-separated list: the servers are restarted for each (default 1,4)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument(
        "--warmup", type=int, default=2, help="seconds of unrecorded load per server and scenario (default 2)"
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32; the file scenario uses 4)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--nginx-workers", default="auto", help="nginx worker_processes (default auto)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s, 1 s warm-up")
    p.add_argument(
        "--per-worker",
        action="store_true",
        help="the per-worker method's defaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PER_WORKER.items())
        + " (each overridable by its option)",
    )
    names = ",".join(s.name for s in SCENARIOS)
    p.add_argument("--scenarios", default=names, help=f"comma-separated subset of {names} (default: all)")
    p.add_argument("--servers", default="ferrule,uwsgi,gunicorn,granian", help="comma-separated subset")
    p.add_argument("--ferrule", help="the ferrule command (default: VENV/bin/ferrule, where benches/run installs it)")
    p.add_argument("--venv", default=sys.prefix, help="venv with the peers (default: the one running this)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary")
    p.add_argument("--out", default=str(BENCHES / "results"), help="results folder (default benches/results)")
    p.add_argument(
        "--name", default="latest", help="the results files' name: NAME.{md,csv,png}, NAME-runs.csv (default latest)"
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    p.add_argument(
        "--request-logs",
        action="store_true",
        help="a log line per request: ferrule with --access-log, uWSGI with its default request logging "
        "(otherwise both are off)",
    )
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--per-worker", action="store_true")
    if preset.parse_known_args(argv)[0].per_worker:
        p.set_defaults(**PER_WORKER)
    args = p.parse_args(argv)
    if isinstance(args.threads, str):  # a default string is not passed through `type`
        args.threads = thread_counts(args.threads)
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
    if not 1 <= args.workers <= 64:
        p.error("workers must be 1..64")
    if not re.fullmatch(r"[\w.-]+", args.name):
        p.error(f"--name {args.name!r}: letters, digits, '.', '-' and '_' only (it names files)")
    return args


@dataclass
class Session:
    """One benchmark run: what start-up hands the scenario loop, and what the loop collects for the report."""

    args: argparse.Namespace
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    expected: Expected | None = None
    # The thread count being measured, the port of its nginx and that nginx (each thread count has its own).
    threads: int = 0
    port: int = 0
    nginx_proc: subprocess.Popen | None = None
    problems: list[str] = field(default_factory=list)
    # Lines the report shows under a scenario's table (who did not take part, TLS handshakes), by (threads, name).
    notes: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    # The servers of each thread count.
    backends: dict[int, list[Backend]] = field(default_factory=dict)

    def note(self, sc: Scenario, text: str) -> None:
        self.notes.setdefault((self.threads, sc.name), []).append(text)


def missing_tool(args: argparse.Namespace) -> bool:
    """Says on stderr what the run cannot start without, if anything is missing."""
    tls_names = [sc.name for sc in SCENARIOS if sc.tls]
    for tool, path in (("nginx", args.nginx), ("wrk", args.wrk)) + ((("openssl", "openssl"),) if tls_names else ()):
        if not shutil.which(path):
            why = f" (deploy/make-certs needs it for {', '.join(tls_names)})" if tool == "openssl" else ""
            print(f"error: {tool} not found ({path}){why}; install it with apt-get", file=sys.stderr)
            return True
    if not os.access(args.ferrule, os.X_OK):
        print(
            f"error: no ferrule command at {args.ferrule}; install ferrule into the venv "
            f"(benches/run does: deploy/install-checkout {args.venv})",
            file=sys.stderr,
        )
        return True
    return False


def start_servers(s: Session, backends: list[Backend]) -> None:
    """Launches every installed server (nginx is started after, once their sockets are named in its config)."""
    for b in backends:
        if b.protocol != "nginx" and not os.access(b.command[0], os.X_OK):
            b.status = "not installed"
            b.version = "–"
            s.problems.append(f"{b.name}: not installed ({b.command[0]} missing); left out")
            continue
        b.version = version_of(b, s.args)
        if b.protocol == "nginx":
            continue
        b.log_path = s.tmp / f"{b.prefix}-t{s.threads}.log"
        b.proc = start_process(b.command, b.log_path, s.env)


def wait_all_ready(s: Session, backends: list[Backend], certs: Path | None) -> None:
    """Waits for each server, takes its idle memory, checks its TLS sessions; one that does not start is left out."""
    for b in backends:
        if b.protocol == "nginx" or b.status != "ok":
            continue
        try:
            wait_ready(b, s.port, s.args.workers)
        except RuntimeError as e:
            b.status = "failed to start"
            s.problems.append(f"{b.name}: failed to start: {e}")
            stop_group(b.proc)
            b.proc = None
            continue
        time.sleep(1)  # let start-up garbage settle before the idle reading
        b.idle_rss_mib = mean_per_worker(b.proc.pid, rss_mib)
        b.idle_pss_mib = mean_per_worker(b.proc.pid, pss_mib)
        print(f"{b.prefix} {b.version} ready: {fmt(b.idle_rss_mib)} MiB RSS per idle worker", file=sys.stderr)
        if b.tls:
            b.tls_seen = tls_resumption(b.tls_port, certs, bench_app.HELLO)
            print(f"  {b.prefix}: {b.tls_seen}", file=sys.stderr)


def note_tls(s: Session, sc: Scenario, order: list[Backend]) -> None:
    # Said the way a server that is not installed is: named, with the reason, and no numbers.
    absent = [f"{n} ({NO_TLS[n]})" for n in s.args.servers if n in NO_TLS]
    if absent:
        s.note(sc, f"Not in this scenario: {', '.join(absent)}.")
        print(f"  {sc.name}: not measured for {', '.join(absent)}", file=sys.stderr)
    for b in order:
        if b.tls_seen:
            s.note(sc, f"{b.name}: {b.tls_seen}.")


def measure_round(s: Session, b: Backend, sc: Scenario, rnd: int) -> Run | None:
    """One round of one server, or None if it could not be measured."""
    # A server that dies during a run is restarted once and the run repeated: the run's numbers (mostly 502s
    # from nginx) say nothing about the server.
    for _ in range(2):
        if not revive(b, s.args, s.port, s.env, s.tmp, s.problems):
            return None
        r = measure(s.args, s.port, b, s.nginx_proc, sc, rnd, s.tmp, s.threads)
        if b.proc is None or b.proc.poll() is None:
            return r
    return None


def run_scenario(s: Session, sc: Scenario, active: list[Backend]) -> None:
    args = s.args
    order = [b for b in active if b.serves(sc) and (b.protocol != "nginx" or sc.ceiling)]
    if sc.tls:
        note_tls(s, sc, order)
    good = []
    for b in order:
        wrong = check_answer(s.port, b, sc, s.expected)
        if wrong:
            s.problems.append(f"{sc.name} on {b.name} ({s.threads} threads): wrong answer ({wrong}); not measured")
            print(f"  {sc.name} on {b.name}: WRONG ANSWER ({wrong})", file=sys.stderr)
        else:
            good.append(b)
    if args.warmup:
        for b in good:
            if revive(b, args, s.port, s.env, s.tmp, s.problems):
                run_wrk(wrk_command(args, s.port, b, sc, args.warmup, s.tmp), args.warmup)
    for rnd in range(1, args.rounds + 1):
        for b in good:
            r = measure_round(s, b, sc, rnd)
            if r is None:
                continue
            s.runs.append(r)
            print(
                f"  t{s.threads} {sc.name:9} round {rnd} {b.name:9} {r.rps:>10,.0f} req/s  "
                f"p50 {fmt(r.p50_ms, 2):>7} ms  p99 {fmt(r.p99_ms, 2):>7} ms  failed {r.failed}  "
                f"cpu worker {fmt(r.worker_cpu_us_per_req, 0)} tree {fmt(r.cpu_us_per_req, 0)} µs/req",
                file=sys.stderr,
            )
    if sc.tls and any(b.name == "ferrule" for b in good):
        time.sleep(1.5)  # ferrule's workers report their counters to its master every second
        counted = ferrule_handshakes(s.port, "/ferrule-tls/metrics")
        if counted:
            s.note(sc, f"ferrule's TLS handshakes with nginx, from the answer checks to the last round: {counted}.")
            print(f"  {sc.name}: ferrule's TLS handshakes: {counted}", file=sys.stderr)


def run_thread_count(s: Session, threads: int, certs: Path | None) -> None:
    """Every server with `threads` app threads per worker behind a new nginx: started, measured, stopped."""
    args = s.args
    s.threads = threads
    backends = build_backends(args, s.tmp, threads)
    s.backends[threads] = backends
    print(f"workers {args.workers}, threads {threads}", file=sys.stderr)
    start_servers(s, backends)
    s.port = free_port()
    conf = nginx_config(args, s.tmp, s.port, [b for b in backends if b.status == "ok"])
    s.nginx_proc = start_nginx(args.nginx, s.tmp, conf, s.env)
    wait_all_ready(s, backends, certs)
    active = [b for b in backends if b.status == "ok"]
    for sc in SCENARIOS:
        run_scenario(s, sc, active)
    stop_all(s)


def stop_all(s: Session) -> None:
    for backends in s.backends.values():
        for b in backends:
            stop_group(b.proc)
            b.proc = None
    stop_group(s.nginx_proc)
    s.nginx_proc = None


def finish(s: Session, started: float) -> int:
    """Writes the report and says how the run went; returns the exit status."""
    # A server missing or failing the same way at each thread count is one problem.
    s.problems[:] = list(dict.fromkeys(s.problems))
    rows = [row for threads, backends in s.backends.items() for row in summarise(s.runs, backends, threads)]
    if rows:
        text = write_outputs(s.args, rows, s.runs, s.backends, s.problems, s.notes)
        print(text)
        name = f"{s.args.out}/{s.args.name}"
        print(f"wrote {name}.{{md,csv,png}} and {name}-runs.csv in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for p in s.problems:
        print(f"problem: {p}", file=sys.stderr)
    aborted = any(p.startswith(("run aborted", "interrupted")) for p in s.problems)
    # A peer that could not run is reported and skipped; ferrule itself not running fails the benchmark (either
    # instance: the Unix-socket one or the TLS one, at any thread count).
    scenario_of = {sc.name: sc for sc in SCENARIOS}

    def measured(b: Backend, threads: int) -> bool:
        return any(
            r.threads == threads and r.server == b.name and b.serves(scenario_of[r.scenario]) for r in s.runs
        )

    ferrule_ok = all(
        b.restarts == 0 and measured(b, threads)
        for threads, backends in s.backends.items()
        for b in backends
        if b.name == "ferrule"
    )
    return 1 if aborted or not s.runs or not ferrule_ok else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    catch_stop_signals()
    if missing_tool(args):
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="ferrule-bench-"))
    s = Session(args, tmp)
    started = time.monotonic()
    try:
        print(f"temp dir {tmp}", file=sys.stderr)
        s.expected = prepare_data(tmp)
        # The Django site's settings want a folder for its database; the django scenario's view uses none, so the
        # folder stays empty (a view that queried it would fail its answer check: there are no tables).
        (tmp / "djsite").mkdir()
        s.env = server_env(args.venv, BENCH_FILE=str(tmp / "file.bin"), DJSITE_DIR=str(tmp / "djsite"))
        tls = any(sc.tls for sc in SCENARIOS) and any(n in ("ferrule", "uwsgi") for n in args.servers)
        certs = make_certs(tmp) if tls else None
        for threads in args.threads:
            run_thread_count(s, threads, certs)
    except (KeyboardInterrupt, Interrupted) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        s.problems.append(f"interrupted ({why}); results are partial")
        print("\ninterrupted; stopping the servers", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  (report what was measured so far, then fail)
        s.problems.append(f"run aborted: {e}")
        print(f"error: {e}", file=sys.stderr)
    finally:
        ignore_stop_signals()
        stop_all(s)
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return finish(s, started)


if __name__ == "__main__":
    sys.exit(main())

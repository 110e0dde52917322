"""Profiles of one worker: where ferrule's and uWSGI's worker spend a scenario's request, with exact counts.

Run it through `benches/run --profile SCENARIO`, which prepares target/profile-venv (benches/profile-venv): ferrule
from this checkout built with its symbols (the `profiling` cargo profile; the wheel is stripped), on the bench
venv's packages, so both servers run the same Python. Each server has one worker with one app thread, behind one
nginx worker process over a Unix socket, loading benches/apps/bench_app.py as the load benchmark does; uWSGI is
`--master --processes 1 --threads 1` except under callgrind (below). For each server:

    perf       `perf record -e cpu-clock -F 1999 -g -p WORKER` while wrk loads it through nginx (after a warm-up);
               the samples by module (ferrule, uwsgi, libpython, libc, kernel, other) and the top symbols, self
               time (`perf report --no-children --sort dso,sym`). The software clock: no hardware counters here.
    strace     `strace -c -f -p WORKER` (all its threads) over N sequential requests sent straight to the server's
               socket by a uwsgi-protocol client; the calls per request. Exact, but a worker's background work
               during the N requests (ferrule's worker reports its counters to the master each second) counts too.
    callgrind  the server started under `valgrind --tool=callgrind --instr-atstart=no` (ferrule's master with
               --trace-children=yes, so its worker runs under callgrind too; uWSGI as one process, `--processes 1`
               without --master), warmed up uninstrumented, then `callgrind_control -i on` and `-z` on the worker,
               N sequential requests, `callgrind_control -d`: the instructions (Ir) per request, user space only.
               Counts repeat exactly from run to run.

The report goes to stdout and to benches/results/profile-SCENARIO.md (--out for elsewhere); its parts are in
benches/profiling, the parsing of what the tools write in benches/harness/profilers.py.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import BENCHES
from harness.nginx import free_port, start_nginx
from harness.processes import Interrupted, catch_stop_signals, ignore_stop_signals, server_env, start_process
from harness.processes import log_tail, stop_group
from harness.procfs import workers_of
from harness.profilers import Symbol, callgrind_total, perf_symbols, strace_counts
from harness.servers import ferrule_command, uwsgi_command
from harness.uwsgi_client import packet, request, status_of
from harness.wrk import parse_wrk, run_wrk
from load.runs import wrk_command
from load.scenarios import SCENARIOS, Scenario
from load.servers import APP, Backend, build_backends, nginx_config, wait_ready
from profiling.report import write_report

import bench  # the answer checks, and the data the file scenario needs

# Bound on a server's start under valgrind: Python's start and the app's imports run many times slower.
VALGRIND_START_TIMEOUT = 600.0
# Bound on a tool's own exit after it was asked to stop.
TOOL_TIMEOUT = 60.0


@dataclass
class Profile:
    """What one server's worker showed."""

    server: str
    samples: int = 0
    symbols: list[Symbol] = field(default_factory=list)
    wrk_rps: float | None = None
    syscalls: dict[str, int] = field(default_factory=dict)
    instructions: int | None = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    usable = [s.name for s in SCENARIOS if s.method == "GET" and not s.tls]
    p.add_argument("--profile", required=True, metavar="SCENARIO", help=f"the scenario: one of {', '.join(usable)}")
    p.add_argument(
        "--requests", type=int, default=2000, help="sequential requests counted by strace and callgrind (default 2000)"
    )
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk load under perf (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk load before perf records (default 2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections under perf (default 16)")
    p.add_argument("--top", type=int, default=25, help="symbols listed per server (default 25)")
    p.add_argument("--top-per-module", type=int, default=10, help="symbols listed per module (default 10)")
    p.add_argument("--servers", default="ferrule,uwsgi", help="comma-separated subset of ferrule,uwsgi")
    p.add_argument("--skip", default="", help="comma-separated tools to leave out: perf, strace, callgrind")
    p.add_argument("--venv", default=sys.prefix, help="venv of both servers (default: the one running this)")
    p.add_argument("--ferrule", help="the ferrule command (default VENV/bin/ferrule)")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary")
    p.add_argument("--out", default=str(BENCHES / "results"), help="results folder (default benches/results)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (profiles, logs) for inspection")
    args = p.parse_args(argv)
    if args.profile not in usable:
        p.error(f"--profile {args.profile}: one of {', '.join(usable)}")
    args.servers = [s for s in args.servers.split(",") if s]
    if not args.servers or set(args.servers) - {"ferrule", "uwsgi"}:
        p.error("--servers: ferrule, uwsgi or both")
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"perf", "strace", "callgrind"}:
        p.error("--skip: perf, strace, callgrind")
    if args.requests < 1:
        p.error("--requests must be at least 1")
    args.venv = os.path.abspath(args.venv)
    args.ferrule = os.path.abspath(args.ferrule or os.path.join(args.venv, "bin", "ferrule"))
    # What load.servers and load.runs read: one worker, one nginx worker, one wrk thread.
    args.workers, args.nginx_workers, args.wrk_threads = 1, "1", 1
    return args


def missing_tools(args) -> list[str]:
    tools = [args.nginx]
    tools += [] if "perf" in args.skip else ["perf", args.wrk]
    tools += [] if "strace" in args.skip else ["strace"]
    tools += [] if "callgrind" in args.skip else ["valgrind", "callgrind_control"]
    return [t for t in tools if not shutil.which(t)]


def the_worker(root: int) -> int:
    """The one worker of a server started with one worker (the root itself for a server without a master)."""
    workers = workers_of(root)
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker under pid {root}, found {workers}")
    return workers[0]


def request_packet(sc: Scenario) -> bytes:
    path, _, query = sc.path.partition("?")
    return packet(path, query, sc.headers)


def sequential(sock: Path, data: bytes, n: int) -> None:
    """n requests, one after the other; RuntimeError on the first that is not a 200."""
    for i in range(n):
        status = status_of(request(str(sock), data))
        if status != 200:
            raise RuntimeError(f"request {i + 1} of {n} answered {status}")


# ---------------------------------------------------------------------------------------------------------------
# perf and strace: the servers as the load benchmark runs them, behind nginx


def record_perf(args, tmp: Path, port: int, b: Backend, sc: Scenario, worker: int, prof: Profile) -> None:
    data = tmp / f"perf-{b.name}.data"
    run_wrk(wrk_command(args, port, b, sc, args.warmup, tmp), args.warmup)
    perf = subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-o", str(data), "-p", str(worker)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # perf attaches to the worker's threads
        out = run_wrk(wrk_command(args, port, b, sc, args.duration, tmp), args.duration)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=TOOL_TIMEOUT)
    if perf.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"perf record exited with {perf.returncode}: {err.strip()}")
    prof.wrk_rps = parse_wrk(out).rps
    prof.samples, prof.symbols = perf_symbols(data)


def count_syscalls(args, tmp: Path, b: Backend, sc: Scenario, worker: int, prof: Profile) -> None:
    summary = tmp / f"strace-{b.name}.txt"
    data = request_packet(sc)
    sequential(b.socket, data, min(args.requests, 100))  # warm, whatever the load before did
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(summary), "-p", str(worker)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # strace says "Process N attached" for each thread; the first line means it is tracing.
        ready, _, _ = select.select([strace.stderr], [], [], TOOL_TIMEOUT)
        line = strace.stderr.readline() if ready else "no word from strace"
        if "attached" not in line:
            raise RuntimeError(f"strace did not attach: {line.strip()}")
        time.sleep(0.3)  # the worker's other threads
        sequential(b.socket, data, args.requests)
    finally:
        strace.send_signal(signal.SIGINT)
        strace.communicate(timeout=TOOL_TIMEOUT)
    prof.syscalls = strace_counts(summary)


def perf_and_strace(args, tmp: Path, env: dict[str, str], sc: Scenario, profiles: dict[str, Profile]) -> None:
    backends = [b for b in build_backends(args, tmp, 1) if b.protocol == "uwsgi"]
    nginx_proc = None
    try:
        for b in backends:
            b.log_path = tmp / f"{b.name}.log"
            b.proc = start_process(b.command, b.log_path, env)
        port = free_port()
        nginx_proc = start_nginx(args.nginx, tmp, nginx_config(args, tmp, port, backends), env)
        for b in backends:
            wait_ready(b, port, 1)
            wrong = bench.check_answer(port, b, sc, args.expected)
            if wrong:
                raise RuntimeError(f"{sc.name} on {b.name}: wrong answer ({wrong})")
        for b in backends:
            prof = profiles[b.name]
            worker = the_worker(b.proc.pid)
            if "perf" not in args.skip:
                print(f"  {b.name}: perf record, {args.duration} s of wrk", file=sys.stderr)
                record_perf(args, tmp, port, b, sc, worker, prof)
            if "strace" not in args.skip:
                print(f"  {b.name}: strace -c, {args.requests} requests", file=sys.stderr)
                count_syscalls(args, tmp, b, sc, worker, prof)
    finally:
        for b in backends:
            stop_group(b.proc)
        stop_group(nginx_proc)


# ---------------------------------------------------------------------------------------------------------------
# callgrind: each server alone under valgrind, requests straight to its socket


def valgrind_command(args, tmp: Path, server: str, sock: Path) -> list[str]:
    vg = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={tmp / f'callgrind-{server}.%p'}",
        f"--log-file={tmp / f'valgrind-{server}.%p.log'}",
    ]  # fmt: skip
    if server == "ferrule":
        cmd = ferrule_command(args.ferrule, ["--socket", f"unix:{sock}"], 1, 1, args.venv, APP)
        # The master is a Python script: run its interpreter under valgrind, and the worker it starts with it.
        return vg + ["--trace-children=yes", str(Path(args.venv) / "bin" / "python"), *cmd]
    # One process: the worker is the process started, no master to tell apart.
    cmd = [a for a in uwsgi_command(args.venv, ["--socket", str(sock)], 1, 1, APP) if a != "--master"]
    return vg + cmd


def callgrind_control(*argv: str) -> None:
    subprocess.run(["callgrind_control", *argv], check=True, capture_output=True, timeout=TOOL_TIMEOUT)


def wait_answering(proc: subprocess.Popen, sock: Path, data: bytes, log: Path) -> None:
    deadline = time.monotonic() + VALGRIND_START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}: {log_tail(log)}")
        if sock.exists():
            try:
                status = status_of(request(str(sock), data, timeout=VALGRIND_START_TIMEOUT))
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as e:
                last = str(e)
        time.sleep(1)
    raise RuntimeError(f"not answering after {VALGRIND_START_TIMEOUT:.0f} s under valgrind ({last})")


def dumps_of(tmp: Path, server: str, pid: int) -> list[Path]:
    """The worker's callgrind files: callgrind-SERVER.PID, and its numbered dumps callgrind-SERVER.PID.N."""
    base = f"callgrind-{server}.{pid}"
    return [f for f in tmp.iterdir() if f.name == base or f.name.startswith(base + ".")]


def count_instructions(args, tmp: Path, env: dict[str, str], server: str, sc: Scenario, prof: Profile) -> None:
    sock = tmp / f"{server}-vg.sock"
    log = tmp / f"{server}-valgrind.log"
    data = request_packet(sc)
    proc = start_process(valgrind_command(args, tmp, server, sock), log, env)
    try:
        print(f"  {server}: starting under valgrind (slow)", file=sys.stderr)
        wait_answering(proc, sock, data, log)
        worker = proc.pid if server == "uwsgi" else the_worker(proc.pid)
        sequential(sock, data, min(args.requests, 200))  # warm, uninstrumented
        callgrind_control("-i", "on", str(worker))
        callgrind_control("-z", str(worker))
        print(f"  {server}: callgrind, {args.requests} requests", file=sys.stderr)
        sequential(sock, data, args.requests)
        before = set(dumps_of(tmp, server, worker))
        callgrind_control("-d", str(worker))
        dumps = sorted(set(dumps_of(tmp, server, worker)) - before, key=lambda d: d.stat().st_mtime)
        if not dumps:
            raise RuntimeError("callgrind_control -d wrote no dump")
        prof.instructions = callgrind_total(dumps[-1])
    finally:
        stop_group(proc)


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_tools(args)
    if missing:
        print(f"error: not installed: {', '.join(missing)} (apt-get install valgrind strace linux-perf)",
              file=sys.stderr)
        return 2
    if not os.access(args.ferrule, os.X_OK):
        print(f"error: no ferrule command at {args.ferrule} (benches/run --profile installs it)", file=sys.stderr)
        return 2
    catch_stop_signals()
    sc = next(s for s in SCENARIOS if s.name == args.profile)
    SCENARIOS[:] = [sc]  # build_backends and nginx_config serve this scenario only
    tmp = Path(tempfile.mkdtemp(prefix="ferrule-profile-"))
    profiles = {name: Profile(name) for name in args.servers}
    started = time.monotonic()
    problems = []
    try:
        print(f"temp dir {tmp}", file=sys.stderr)
        args.expected = bench.prepare_data(tmp) if sc.name == "file" else bench.Expected(b"", 0)
        (tmp / "djsite").mkdir()
        env = server_env(args.venv, BENCH_FILE=str(tmp / "file.bin"), DJSITE_DIR=str(tmp / "djsite"))
        if not {"perf", "strace"} <= args.skip:
            perf_and_strace(args, tmp, env, sc, profiles)
        if "callgrind" not in args.skip:
            for name in args.servers:
                count_instructions(args, tmp, env, name, sc, profiles[name])
    except (KeyboardInterrupt, Interrupted) as e:
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        problems.append(f"interrupted ({why}); the report is partial")
        print(f"\ninterrupted ({why}); stopping the servers", file=sys.stderr)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
        problems.append(f"run aborted: {e}")
        print(f"error: {e}", file=sys.stderr)
    finally:
        ignore_stop_signals()
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text, path = write_report(args, sc, list(profiles.values()), problems)
    print(text)
    print(f"wrote {path} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

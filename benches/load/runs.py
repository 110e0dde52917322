"""One wrk run against one server, with the CPU and memory readings around it, and the medians across rounds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.procfs import MemorySampler, tree_and_worker_cpu_seconds
from harness.wrk import parse_wrk, run_wrk

from .scenarios import SCENARIOS, Scenario
from .servers import Backend

RATIO_METRICS = ["rps", "p50_ms", "p99_ms", "worker_cpu_us_per_req", "cpu_us_per_req", "rss_mib", "idle_rss_mib"]
CSV_FIELDS = [
    "threads", "scenario", "server", "rounds", "requests", "rps", "of_ceiling", "p50_ms", "p99_ms", "failed",
    "worker_cpu_us_per_req", "cpu_us_per_req", "nginx_cpu_us_per_req", "rss_mib", "idle_rss_mib", "pss_mib",
    "idle_pss_mib",
] + [f"ferrule_over_{m}" for m in RATIO_METRICS]  # fmt: skip


@dataclass
class Run:
    threads: int  # app threads per worker of this run's servers
    scenario: str
    server: str
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    # The workers' own CPU (the tree minus the master's own utime+stime), then the whole tree's.
    worker_cpu_us_per_req: float | None
    cpu_us_per_req: float | None
    nginx_cpu_us_per_req: float | None
    rss_mib: float | None
    pss_mib: float | None


def wrk_command(args, port: int, backend: Backend, scenario: Scenario, duration: int, tmp: Path) -> list[str]:
    cmd = [
        args.wrk,
        f"--threads={args.wrk_threads}",
        f"--connections={scenario.connections or args.connections}",
        f"--duration={duration}s",
        f"--timeout={scenario.wrk_timeout}s",
        "--latency",
    ]
    for name, value in scenario.headers:
        cmd.append(f"--header={name}: {value}")
    if scenario.method == "POST":
        cmd.append(f"--script={tmp / 'post.lua'}")
    cmd.append(f"http://127.0.0.1:{port}/{backend.prefix}{scenario.path}")
    return cmd


def measure(args, port, backend: Backend, nginx_proc, scenario: Scenario, rnd: int, tmp: Path, threads: int) -> Run:
    root = backend.proc.pid if backend.proc else None
    cmd = wrk_command(args, port, backend, scenario, args.duration, tmp)
    with MemorySampler(root) as mem:
        cpu0, wcpu0 = tree_and_worker_cpu_seconds(root) if root else (None, None)
        ngx0, _ = tree_and_worker_cpu_seconds(nginx_proc.pid)
        out = run_wrk(cmd, args.duration)
        cpu1, wcpu1 = tree_and_worker_cpu_seconds(root) if root else (None, None)
        ngx1, _ = tree_and_worker_cpu_seconds(nginx_proc.pid)
    res = parse_wrk(out)
    per_req = 1e6 / res.requests if res.requests else None
    return Run(
        threads=threads,
        scenario=scenario.name,
        server=backend.name,
        round=rnd,
        requests=res.requests,
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        failed=res.non2xx + res.socket_errors,
        worker_cpu_us_per_req=(wcpu1 - wcpu0) * per_req if root and per_req else None,
        cpu_us_per_req=(cpu1 - cpu0) * per_req if root and per_req else None,
        nginx_cpu_us_per_req=(ngx1 - ngx0) * per_req if per_req else None,
        rss_mib=mem.peak_rss,
        pss_mib=mem.peak_pss,
    )


def median(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def _row(threads: int, sc: Scenario, b: Backend, mine: list[Run]) -> dict:
    return {
        "threads": threads,
        "scenario": sc.name,
        "server": b.name,
        "rounds": len(mine),
        "requests": sum(r.requests for r in mine),
        "rps": median(r.rps for r in mine),
        "p50_ms": median(r.p50_ms for r in mine),
        "p99_ms": median(r.p99_ms for r in mine),
        "failed": sum(r.failed for r in mine),
        "worker_cpu_us_per_req": median(r.worker_cpu_us_per_req for r in mine),
        "cpu_us_per_req": median(r.cpu_us_per_req for r in mine),
        "nginx_cpu_us_per_req": median(r.nginx_cpu_us_per_req for r in mine),
        "rss_mib": median(r.rss_mib for r in mine),
        "pss_mib": median(r.pss_mib for r in mine),
        "idle_rss_mib": b.idle_rss_mib,
        "idle_pss_mib": b.idle_pss_mib,
    }


def summarise(runs: list[Run], backends: list[Backend], threads: int) -> list[dict]:
    """One row per server and scenario of one thread count (`backends` are its servers): medians across rounds,
    the fraction of the ceiling, ferrule/peer ratios of the medians."""
    rows = []
    for sc in SCENARIOS:
        for b in backends:
            if not b.serves(sc):
                continue
            mine = [r for r in runs if r.threads == threads and r.scenario == sc.name and r.server == b.name]
            if mine:
                rows.append(_row(threads, sc, b, mine))
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

"""wrk, the load generator: running it with a bound on its time, and reading its --latency output."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass


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


def duration_ms(text: str) -> float:
    """A wrk duration ("1.25ms", "3.10s") in milliseconds."""
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
        seconds=duration_ms(done.group(2)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=duration_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=duration_ms(p99.group(1)) if p99 else float("nan"),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(cmd: list[str], duration: int) -> str:
    """Runs wrk for a run of `duration` seconds and returns its output; RuntimeError if it fails."""
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

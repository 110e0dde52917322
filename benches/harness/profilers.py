"""Reading what the profilers write: perf's report by shared object and symbol, callgrind's instruction total,
strace's per-system-call counts."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The modules a sample is grouped by, in report order; `module_of` names them.
MODULES = ["ferrule", "uwsgi", "libpython", "libc", "kernel", "other"]


def module_of(dso: str) -> str:
    """The module of a perf shared object: ferrule's extension module, uWSGI's binary, CPython, libc, the kernel,
    or other (Python extension modules, libm, the loader, unresolved addresses)."""
    name = Path(dso).name
    if name.startswith("_ferrule"):
        return "ferrule"
    if name == "uwsgi":
        return "uwsgi"
    if name.startswith("libpython") or re.fullmatch(r"python3(\.\d+)?", name):
        return "libpython"
    if name.startswith(("libc.so", "libc-")):
        return "libc"
    if dso.startswith("[kernel") or dso.startswith("[vdso"):
        return "kernel"
    return "other"


@dataclass
class Symbol:
    percent: float
    dso: str
    module: str
    kernel: bool  # perf's [k] rather than [.]
    name: str


def perf_symbols(data: Path) -> tuple[int, list[Symbol]]:
    """(samples, symbols by share of the samples, largest first) of a perf.data file: self time only."""
    # -n: each line's sample count too (the header rounds the total to thousands).
    cmd = ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none", "-n",
           "--percent-limit", "0"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    samples = 0
    symbols = []
    for line in out.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if m:
            dso = m.group(3)
            samples += int(m.group(2))
            symbols.append(Symbol(float(m.group(1)), dso, module_of(dso), m.group(4) == "k", m.group(5)))
    symbols.sort(key=lambda s: -s.percent)
    return samples, symbols


def by_module(symbols: list[Symbol]) -> dict[str, float]:
    shares = dict.fromkeys(MODULES, 0.0)
    for s in symbols:
        shares[s.module] += s.percent
    return shares


def callgrind_total(dump: Path) -> int:
    """The instructions (Ir) a callgrind dump counted: its `totals:` (or `summary:`) line."""
    text = dump.read_text(errors="replace")
    m = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.MULTILINE)
    if not m:
        raise ValueError(f"no totals in {dump}")
    return int(m.group(1))


def strace_counts(summary: Path) -> dict[str, int]:
    """Calls per system call from `strace -c -o FILE`'s table."""
    counts = {}
    for line in summary.read_text(errors="replace").splitlines():
        tokens = line.split()
        if len(tokens) < 5 or not re.fullmatch(r"[\d.]+", tokens[0]) or tokens[-1] == "total":
            continue
        if tokens[3].isdigit():
            counts[tokens[-1]] = int(tokens[3])
    return counts

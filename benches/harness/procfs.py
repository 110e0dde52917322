"""/proc readings: process trees, CPU time of a tree, and the memory (RSS, PSS, private) of its processes."""

from __future__ import annotations

import os
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KIB_PER_MIB = 1024  # /proc reports memory in kB


def proc_stat(pid: int) -> tuple[int, int] | None:
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


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def process_tree(root: int) -> list[int]:
    """The root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def own_cpu_ticks(pid: int) -> int | None:
    """utime+stime of the process alone (not its reaped children), in ticks, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def tree_and_worker_cpu_seconds(root: int) -> tuple[float, float]:
    """CPU time of the whole tree under `root`, and of its workers: the tree minus the root's own utime+stime.

    The workers' figure keeps the root's cutime+cstime, the time of children it reaped, so a worker replaced
    during a run still counts as worker time."""
    total = 0
    for pid in process_tree(root):
        st = proc_stat(pid)
        if st is not None:
            total += st[1]
    own = own_cpu_ticks(root) or 0
    return total / CLOCK_TICKS, (total - own) / CLOCK_TICKS


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


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """The kB fields of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...), or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            out[parts[0][:-1]] = int(parts[1])
    # A zombie (exited, not yet reaped) has an empty rollup.
    return out or None


@dataclass
class Memory:
    processes: int  # in the tree, with memory (zombies left out)
    total_pss_mib: float
    workers: int  # of the pids that answered, how many are alive in the tree
    private_mib: float | None  # mean per worker of Private_Clean + Private_Dirty
    rss_mib: float | None  # mean per worker
    worker_pss_mib: float | None  # mean per worker
    other_pss_mib: float  # the rest of the tree: master, zygote, ...


def measure_memory(root: int, worker_pids: set[int]) -> Memory:
    """The memory of the tree under `root`, with `worker_pids` (the processes that answered) as its workers."""
    tree = {}
    for pid in process_tree(root):
        m = smaps_rollup(pid)
        if m is not None:
            tree[pid] = m
    workers = [m for pid, m in tree.items() if pid in worker_pids]

    def mean(values):
        return statistics.fmean(values) / KIB_PER_MIB if values else None

    total = sum(m.get("Pss", 0) for m in tree.values())
    worker_pss = sum(m.get("Pss", 0) for m in workers)
    return Memory(
        processes=len(tree),
        total_pss_mib=total / KIB_PER_MIB,
        workers=len(workers),
        private_mib=mean([m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) for m in workers]),
        rss_mib=mean([m.get("Rss", 0) for m in workers]),
        worker_pss_mib=mean([m.get("Pss", 0) for m in workers]),
        other_pss_mib=(total - worker_pss) / KIB_PER_MIB,
    )

"""Processes: a server starts in its own process group and is stopped by that group, always; its log; stop signals."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .procfs import alive

# Bound on each wait for a process to exit, so a hung server fails the run instead of hanging it.
STOP_TIMEOUT = 15.0

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Best effort for a benchmark killed with SIGKILL: the direct child gets SIGKILL too. Normal exits, Ctrl-C and
    # SIGTERM go through stop_group() instead, which also reaches the children's own workers.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def server_env(venv: str, **extra: str) -> dict[str, str]:
    """The environment servers start in: ours, with `extra`, unbuffered output and the venv's bin first on PATH."""
    env = dict(os.environ, **extra, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(venv) / 'bin'}:{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


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


def _terminate(proc: subprocess.Popen, sig: int) -> bool:
    """Sends `sig` to the group's leader and waits for it; false if it did not exit within STOP_TIMEOUT."""
    if proc.poll() is not None:
        return True
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    # Workers left behind (or the leader itself after the timeout) go with the group, which start_new_session made
    # the leader's own.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stops a process started by start_process and everything in its process group."""
    if proc is None:
        return
    if not _terminate(proc, sig):
        print(f"  pid {proc.pid} did not stop within {STOP_TIMEOUT:.0f} s; killing its group", file=sys.stderr)
    _kill_group(proc)


def stop_server(proc: subprocess.Popen, pids: list[int]) -> tuple[float, str | None]:
    """SIGTERM, then SIGKILL to the group after STOP_TIMEOUT, then to any of `pids` (the server's tree) still
    alive; returns the seconds SIGTERM took and what went wrong."""
    t0 = time.monotonic()
    problem = None
    if not _terminate(proc, signal.SIGTERM):
        problem = f"did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killed"
    took = time.monotonic() - t0
    _kill_group(proc)
    # A process of the tree that left the group (setsid) would still be here: ours, so ended by its pid.
    deadline = time.monotonic() + 5
    left = [p for p in pids if p != proc.pid and alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    if left:
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        problem = (problem + "; " if problem else "") + f"pids {left} outlived the server's group; killed"
    return took, problem


def read_log(path: Path) -> str:
    """A server's log without ANSI colour codes (they would split the fields of a coloured log)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))


def log_tail(path: Path | None, lines: int = 8) -> str:
    if path is None or not path.exists():
        return ""
    return " | ".join(read_log(path).strip().splitlines()[-lines:])


def log_head(path: Path, lines: int = 6) -> str:
    if not path.exists():
        return ""
    text = [ln for ln in read_log(path).splitlines() if ln]
    return " | ".join(text[:lines])


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so the finally blocks stop every server."""


def raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def catch_stop_signals() -> None:
    """SIGTERM and SIGHUP raise Interrupted from here on."""
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGHUP, raise_interrupted)


def ignore_stop_signals() -> None:
    """For the clean-up: a second Ctrl-C must not cut it short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

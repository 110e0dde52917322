"""What was measured on what: versions of the servers and tools, and the machine, for the reports."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

from . import REPO


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


def ferrule_version(ferrule) -> str:
    out = run_quiet([str(ferrule), "--version"])
    # The package is built from the work tree: say which commit, and whether it had local changes.
    commit = git_commit()
    return (out.split()[-1] if out else "?") + (f" (git {commit})" if commit else "")


def uwsgi_version(uwsgi) -> str:
    return run_quiet([str(uwsgi), "--version"]) or "?"


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


def nginx_version(nginx: str) -> str:
    m = re.search(r"nginx/(\S+)", run_quiet([nginx, "-v"]))
    return m.group(1) if m else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine_rows(venv: str, cpu: bool = False) -> list[tuple[str, str]]:
    """The first rows of a report's machine table: date, cores, the CPU if asked, kernel and the venv's Python."""
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cores (nproc)", str(len(os.sched_getaffinity(0)))),
        *([("CPU", cpu_model())] if cpu else []),
        ("kernel", platform.release()),
        ("python", python_version(venv)),
    ]

#!/usr/bin/env python3
"""Build ferrule's release wheels and try them as a user would.

Builds one manylinux2014 wheel per supported CPython (3.10 to 3.13, plus 3.14 where one is installed) with
maturin and zig (no Docker), checks each wheel (platform tag, no libpython dependency, no RUNPATH, stripped,
its size), then installs the wheels of the oldest and the newest Python into fresh venvs and runs a smoke test
through a real nginx: a Flask app answers, SIGHUP replaces the workers with no failed request, SIGTERM stops
everything and removes the socket.

Usage: .ci/wheels.py [--out DIR]   (run from anywhere; exits non-zero on the first failure)
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]
OPTIONAL = ["3.14"]
# zig releases after 0.14 broke C builds of crates such as ring and aws-lc-sys; 0.14.1 is the one tested here.
TOOLS = ["maturin>=1.9,<2", "ziglang==0.14.1"]
TOOLS_VENV = ROOT / "target" / "ci-tools"
# Every bounded wait of the smoke test.
WAIT = 30


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"wheels: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    printable = " ".join(str(c) for c in cmd)
    done = subprocess.run([str(c) for c in cmd], **kw)
    if done.returncode != 0:
        fail(f"{printable} exited with {done.returncode}")
    return done


def find_python(version: str):
    """The interpreter for `version`: on PATH if it runs, else pyenv's."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def tools() -> Path:
    if not (TOOLS_VENV / "bin" / "maturin").exists():
        step(f"installing {' '.join(TOOLS)} into {TOOLS_VENV}")
        run([sys.executable, "-m", "venv", TOOLS_VENV])
        run([TOOLS_VENV / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TOOLS])
    return TOOLS_VENV / "bin"


def build(pythons: dict, out: Path) -> list:
    bin_dir = tools()
    shutil.rmtree(out, ignore_errors=True)
    cmd = [bin_dir / "maturin", "build", "--release", "--zig", "--compatibility", "manylinux2014", "--out", out]
    for python in pythons.values():
        cmd += ["-i", python]
    step(f"maturin build --release --zig --compatibility manylinux2014 for CPython {', '.join(pythons)}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CARGO_TARGET_DIR=str(ROOT / "target" / "wheel-zig"))
    run(cmd, cwd=ROOT, env=env)
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != len(pythons):
        fail(f"expected {len(pythons)} wheels in {out}, found {[w.name for w in wheels]}")
    return wheels


def check(wheel: Path) -> None:
    if "manylinux2014_x86_64" not in wheel.name:
        fail(f"{wheel.name} is not tagged manylinux2014_x86_64")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.startswith("ferrule/_ferrule") and n.endswith(".so")]
        if len(modules) != 1:
            fail(f"{wheel.name}: expected one extension module, found {modules}")
        so = Path(z.extract(modules[0], tmp))
        dynamic = run(["readelf", "-d", so], capture_output=True, text=True).stdout
        sections = run(["readelf", "-S", so], capture_output=True, text=True).stdout
        if "libpython" in dynamic:
            fail(f"{wheel.name}: the extension links libpython:\n{dynamic}")
        if "RPATH" in dynamic or "RUNPATH" in dynamic:
            fail(f"{wheel.name}: the extension has a RPATH/RUNPATH:\n{dynamic}")
        if ".debug_info" in sections:
            fail(f"{wheel.name}: the extension carries debug info (not stripped)")
        size = so.stat().st_size
    print(f"    {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB wheel, {size / 1e6:.2f} MB module, "
          "no libpython, no RUNPATH, stripped", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=WAIT) as r:
        return r.status, r.read()


def wait_for(what: str, done, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.05)
    fail(f"{what} within {WAIT}s; ferrule's log:\n{log.read_text(errors='replace')}")


SMOKE_APP = '''
import os, sys
from flask import Flask, jsonify
app = Flask(__name__)

@app.get("/")
def index():
    return jsonify(pid=os.getpid(), version="%d.%d" % sys.version_info[:2], prefix=sys.prefix)
'''


def smoke(version: str, python: str, wheel: Path) -> None:
    step(f"smoke test: CPython {version}, fresh venv, {wheel.name}, behind nginx")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with tempfile.TemporaryDirectory(prefix="ferrule-wheel-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        run([python, "-m", "venv", venv])
        run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, "flask>=3,<4"])
        (tmp / "smoke_app.py").write_text(SMOKE_APP)
        version_out = run([venv / "bin" / "ferrule", "--version"], capture_output=True, text=True).stdout
        print(f"    ferrule --version: {version_out.strip()}")
        run([venv / "bin" / "python", "-m", "ferrule", "--check-config", "--chdir", tmp, "smoke_app:app"],
            capture_output=True)

        sock = tmp / "app.sock"
        port = free_port()
        (tmp / "nginx.conf").write_text(f"""
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/cbt; proxy_temp_path {tmp}/pt; fastcgi_temp_path {tmp}/ft;
    uwsgi_temp_path {tmp}/ut; scgi_temp_path {tmp}/st;
    server {{
        listen 127.0.0.1:{port};
        location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass unix:{sock}; }}
    }}
}}
""")
        log = tmp / "ferrule.log"
        with open(log, "w") as out:
            ferrule = subprocess.Popen(
                [venv / "bin" / "ferrule", "--socket", f"unix:{sock}", "--workers", "2", "--chdir", tmp,
                 "smoke_app:app"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proxy = subprocess.Popen([nginx, "-e", tmp / "nginx-error.log", "-p", tmp, "-c", tmp / "nginx.conf"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for("ferrule was not ready", lambda: "ready workers=" in log.read_text(errors="replace"), log)
            wait_for("nginx did not accept", lambda: port_open(port), log)
            status, body = http_get(port, "/")
            answer = json.loads(body)
            if status != 200 or answer["version"] != version or answer["prefix"] != str(venv):
                fail(f"unexpected answer {status} {answer} (want Python {version} in {venv})")
            pids(port, 8)
            before = generation_pids(log, 0)
            if len(before) != 2:
                fail(f"expected two workers of generation 0, found {before}\n{log.read_text()}")

            ferrule.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + WAIT
            after = set()
            while time.monotonic() < deadline:
                after = pids(port, 4)  # every request must succeed throughout the reload
                exited = {int(p) for p in re.findall(r"worker exited worker=\d+ pid=(\d+)", log.read_text())}
                if before <= exited and not after & before:
                    break
            if after & before or not before <= exited:
                fail(f"SIGHUP: the old workers {before} were not replaced\n{log.read_text()}")
            after = generation_pids(log, 1)

            ferrule.send_signal(signal.SIGTERM)
            try:
                code = ferrule.wait(WAIT)
            except subprocess.TimeoutExpired:
                fail(f"no exit within {WAIT}s of SIGTERM\n{log.read_text()}")
            if code != 0:
                fail(f"exit status {code} after SIGTERM\n{log.read_text()}")
            if sock.exists():
                fail(f"{sock} is still there after SIGTERM")
            print(f"    Python {answer['version']} from {answer['prefix']}: served, reloaded "
                  f"({sorted(before)} -> {sorted(after)}), stopped cleanly", flush=True)
        finally:
            for proc in (proxy, ferrule):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def generation_pids(log: Path, generation: int) -> set:
    """The pids of the workers the master started for a generation (0 at start, 1 after the first SIGHUP)."""
    pattern = rf"worker started worker=\d+ pid=(\d+) generation={generation}\b"
    return {int(p) for p in re.findall(pattern, log.read_text(errors="replace"))}


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def pids(port: int, requests: int) -> set:
    seen = set()
    for _ in range(requests):
        status, body = http_get(port, "/")
        if status != 200:
            fail(f"a request failed with {status}")
        seen.add(json.loads(body)["pid"])
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "target" / "wheels"), help="where the wheels go")
    args = p.parse_args()
    pythons = {}
    for version in SUPPORTED:
        python = find_python(version)
        if python is None:
            fail(f"no CPython {version} found (pyenv install {version}): every supported version is built")
        pythons[version] = python
    for version in OPTIONAL:
        python = find_python(version)
        if python:
            pythons[version] = python
        else:
            print(f"    CPython {version}: not installed here, no wheel built for it", flush=True)
    wheels = build(pythons, Path(args.out))
    for wheel in wheels:
        check(wheel)
    oldest, newest = list(pythons)[0], list(pythons)[-1]
    for version in (oldest, newest):
        tag = "cp" + version.replace(".", "")
        wheel = next(w for w in wheels if f"-{tag}-" in w.name)
        smoke(version, pythons[version], wheel)
    step(f"wheels: {len(wheels)} built and checked, smoke tests passed on CPython {oldest} and {newest}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Install each built wheel that has an interpreter here into a fresh venv and use it through the host's nginx.

The matrix (CPython version x CPU) and where each cell's interpreter comes from:
  x86_64 3.10-3.13   pyenv's, on the host
  x86_64 3.14, 3.15  Debian sid's python3.14/python3.15, in a debootstrap root entered with chroot
  aarch64 3.11       Debian bookworm's, in an arm64 root run through qemu-user-static
  aarch64 3.13       Debian trixie's, likewise
  aarch64 3.14, 3.15 Debian sid's, likewise
  aarch64 3.10, 3.12 not run: no arm64 build of them can be installed here (built and checked only)

On x86_64, a Flask app and a Django app from PyPI: SIGHUP under light load with no failed request, a request
past --timeout answered 504 with its Python stack logged, SIGTERM draining an in-flight request, and
--preload behind a tls:// socket that nginx reaches with suwsgi://. On aarch64 (emulated, about ten times
slower) a plain WSGI app: served through nginx, SIGHUP under load, SIGTERM draining (not --preload: qemu-user
refuses the prctl it needs). ferrule listens on TCP loopback, which a chroot shares with the host, so the host's nginx
reaches it directly. The roots are cached (see roots.py); runs as root.

Usage: .ci/wheels_test.py [--wheels DIR] [--only VERSION/ARCH]...   (exits non-zero if any cell failed)
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ci_common import (ROOT, Failure, Timer, fail, free_port, http_get, main_guard, note, port_open,  # noqa: E402
                       run, step, wait_for)
from roots import ROOT_CA_BUNDLE, Root, ensure, mounted  # noqa: E402

SID_AMD64 = Root("sid", "amd64", ("python3.14", "python3.14-venv", "python3.15", "python3.15-venv"))
# debootstrap does not follow python3.11-venv to python3-distutils, which it needs, by itself.
BOOKWORM_ARM64 = Root("bookworm", "arm64", ("python3.11", "python3.11-venv", "python3-distutils"))
TRIXIE_ARM64 = Root("trixie", "arm64", ("python3.13", "python3.13-venv"))
SID_ARM64 = Root("sid", "arm64", ("python3.14", "python3.14-venv", "python3.15", "python3.15-venv"))


@dataclass(frozen=True)
class Cell:
    version: str
    arch: str
    root: Root = None  # None: pyenv's interpreter on the host

    @property
    def name(self) -> str:
        return f"{self.version}/{self.arch}"

    @property
    def emulated(self) -> bool:
        return self.arch != "x86_64"

    def where(self) -> str:
        return f"Debian {self.root.suite} {self.root.arch} root" if self.root else "pyenv"


MATRIX = [
    *(Cell(v, "x86_64") for v in ("3.10", "3.11", "3.12", "3.13")),
    Cell("3.14", "x86_64", SID_AMD64),
    Cell("3.15", "x86_64", SID_AMD64),
    Cell("3.11", "aarch64", BOOKWORM_ARM64),
    Cell("3.13", "aarch64", TRIXIE_ARM64),
    Cell("3.14", "aarch64", SID_ARM64),
    Cell("3.15", "aarch64", SID_ARM64),
]
NOT_RUN = {
    "3.10/aarch64": "no arm64 CPython 3.10 can be installed here (no Debian release packages it)",
    "3.12/aarch64": "no arm64 CPython 3.12 can be installed here (no Debian release packages it)",
}
# The environment of commands run in a root: nothing of the host's (pyenv, virtualenvs) leaks in.
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CERT": ROOT_CA_BUNDLE}
THREAD_WARNING = "started threads while it was imported"

FLASK_APP = '''
import os, sys, time
from flask import Flask, jsonify, request
app = Flask(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))

@app.get("/")
def index():
    return jsonify(pid=os.getpid(), version="%d.%d" % sys.version_info[:2], prefix=sys.prefix, app="flask")

@app.get("/slow")
def slow():
    open(os.path.join(HERE, "in-flight"), "w").close()
    time.sleep(float(request.args["s"]))
    return jsonify(pid=os.getpid(), slept=True)

@app.get("/stuck")
def stuck_in_flask_view():
    time.sleep(120)
    return "not reached"
'''

DJANGO_APP = '''
import os, sys
from django.conf import settings
settings.configure(DEBUG=False, SECRET_KEY="ci-only", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, MIDDLEWARE=[])
from django.core.wsgi import get_wsgi_application
from django.http import JsonResponse
from django.urls import path

def index(request):
    return JsonResponse(dict(pid=os.getpid(), version="%d.%d" % sys.version_info[:2], prefix=sys.prefix,
                             app="django"))

urlpatterns = [path("", index)]
application = get_wsgi_application()
'''

PLAIN_APP = '''
import json, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        open(os.path.join(HERE, "in-flight"), "w").close()
        time.sleep(float(environ["QUERY_STRING"].split("=")[1]))
    body = json.dumps(dict(pid=os.getpid(), version="%d.%d" % sys.version_info[:2], prefix=sys.prefix,
                           app="plain")).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


class Place:
    """A cell's working directory and how its commands run: on the host, or chrooted into its root. `inside`
    is a path as the cell's processes see it, `outside` the same directory as the host (and nginx) sees it."""

    def __init__(self, cell: Cell):
        self.cell = cell
        self.inside = Path(f"/tmp/ferrule-wheels-{cell.version}-{cell.arch}")
        base = cell.root.path if cell.root else Path("/")
        self.outside = base / self.inside.relative_to("/")
        shutil.rmtree(self.outside, ignore_errors=True)
        self.outside.mkdir(parents=True)

    def cmd(self, argv) -> list:
        return ["chroot", self.cell.root.path, *argv] if self.cell.root else list(argv)

    def env(self) -> dict:
        return ROOT_ENV if self.cell.root else dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")

    def python(self) -> str:
        if self.cell.root:
            return f"/usr/bin/python{self.cell.version}"
        pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
        found = sorted(glob.glob(f"{pyenv}/versions/{self.cell.version}.*/bin/python{self.cell.version}"))
        if not found:
            fail(f"cell {self.cell.name}: no pyenv CPython {self.cell.version} (pyenv install {self.cell.version})")
        return found[-1]


def make_certificates(into: Path) -> None:
    """A CA, ferrule's certificate (DNS name `ferrule`, which nginx checks) and nginx's client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", into / "ca.key", "-out", into / "ca.crt", "-days", "2",
         "-subj", "/CN=ferrule CI CA"], capture_output=True)
    for name, ext in (("ferrule", "subjectAltName=DNS:ferrule\nextendedKeyUsage=serverAuth\n"),
                      ("nginx-client", "extendedKeyUsage=clientAuth\n")):
        (into / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        run(["openssl", "req", *ec, "-keyout", into / f"{name}.key", "-out", into / f"{name}.csr",
             "-subj", f"/CN={name}"], capture_output=True)
        run(["openssl", "x509", "-req", "-in", into / f"{name}.csr", "-CA", into / "ca.crt", "-CAkey",
             into / "ca.key", "-CAcreateserial", "-out", into / f"{name}.crt", "-days", "2", "-extfile",
             into / f"{name}.ext"], capture_output=True)


class Server:
    """ferrule (in the cell's place) and the host's nginx in front of it, for one scenario; both are killed
    when the block ends, however it ends."""

    def __init__(self, place: Place, label: str, args: list, wait: float, tls: Path = None):
        self.place, self.label, self.wait, self.tls = place, f"cell {place.cell.name}, {label}", wait, tls
        self.backend, self.port = free_port(), free_port()
        self.log = place.outside / f"ferrule-{label}.log"
        self.nginx_dir = Path(tempfile.mkdtemp(prefix="ferrule-wheels-nginx-"))
        scheme = "tls" if tls else ""
        socket = f"{scheme + '://' if tls else ''}127.0.0.1:{self.backend}"
        tls_args = []
        if tls:
            tls_args = ["--tls-cert", place.inside / "ferrule.crt", "--tls-key", place.inside / "ferrule.key",
                        "--tls-client-ca", place.inside / "ca.crt"]
        self.argv = place.cmd([place.inside / "venv" / "bin" / "ferrule", "--socket", socket, *tls_args,
                               "--chdir", place.inside, *args])
        self.ferrule = self.nginx = None

    def nginx_conf(self) -> str:
        d = self.nginx_dir
        if self.tls:
            upstream = f"""uwsgi_pass suwsgi://127.0.0.1:{self.backend};
                uwsgi_ssl_certificate {self.tls}/nginx-client.crt;
                uwsgi_ssl_certificate_key {self.tls}/nginx-client.key;
                uwsgi_ssl_trusted_certificate {self.tls}/ca.crt;
                uwsgi_ssl_verify on; uwsgi_ssl_name ferrule; uwsgi_ssl_protocols TLSv1.2 TLSv1.3;"""
        else:
            upstream = f"uwsgi_pass 127.0.0.1:{self.backend};"
        return f"""
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/cbt; proxy_temp_path {d}/pt; fastcgi_temp_path {d}/ft;
    uwsgi_temp_path {d}/ut; scgi_temp_path {d}/st;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{ include /etc/nginx/uwsgi_params; {upstream} uwsgi_read_timeout {self.wait:.0f}s; }}
    }}
}}
"""

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def context(self) -> str:
        errors = self.nginx_dir / "error.log"
        nginx = errors.read_text(errors="replace")[-3000:] if errors.exists() else ""
        return f"--- ferrule's log ({self.log}) ---\n{self.text()[-6000:]}\n--- nginx's error log ---\n{nginx}"

    def fail(self, msg: str):
        fail(f"{self.label}: {msg}\n{self.context()}")

    def __enter__(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.nginx_dir / "nginx.conf").write_text(self.nginx_conf())
        with open(self.log, "w") as out:
            self.ferrule = subprocess.Popen([str(a) for a in self.argv], stdout=out, stderr=subprocess.STDOUT,
                                            env=self.place.env(), start_new_session=True)
        self.nginx = subprocess.Popen([nginx, "-e", self.nginx_dir / "error.log", "-p", self.nginx_dir,
                                       "-c", self.nginx_dir / "nginx.conf"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(f"{self.label}: ferrule was not ready", lambda: "ready workers=" in self.text()
                     or self.ferrule.poll() is not None, self.wait, self.context)
            if self.ferrule.poll() is not None:
                self.fail(f"ferrule exited with {self.ferrule.returncode} at start-up")
            wait_for(f"{self.label}: nginx did not accept", lambda: port_open(self.port), self.wait, self.context)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for proc in (self.nginx, self.ferrule):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.nginx_dir, ignore_errors=True)

    def get(self, path: str) -> tuple:
        try:
            return http_get(self.port, path, self.wait)
        except OSError as e:
            self.fail(f"GET {path}: {e}")

    def answer(self, want_app: str) -> dict:
        status, body = self.get("/")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        venv = str(self.place.inside / "venv")
        if status != 200 or not answer or answer["version"] != self.place.cell.version \
                or answer["prefix"] != venv or answer["app"] != want_app:
            self.fail(f"unexpected answer {status} {body[:300]!r} (want the {want_app} app on Python "
                      f"{self.place.cell.version} in {venv})")
        return answer

    def generation_pids(self, generation: int) -> set:
        """The pids of the workers the master started for a generation (0 at start, 1 after a SIGHUP)."""
        pattern = rf"worker started worker=\d+ pid=(\d+) generation={generation}\b"
        return {int(p) for p in re.findall(pattern, self.text())}

    def exited_pids(self) -> set:
        return {int(p) for p in re.findall(r"worker exited worker=\d+ pid=(\d+)", self.text())}

    def sighup_under_load(self, workers: int) -> str:
        wait_for(f"{self.label}: {workers} workers of generation 0 were not started",
                 lambda: len(self.generation_pids(0)) == workers, self.wait, self.context)
        before = self.generation_pids(0)
        answers, failures, stop = [], [], threading.Event()

        def load():
            while not stop.is_set():
                try:
                    status, body = http_get(self.port, "/", self.wait)
                    if status == 200:
                        answers.append(json.loads(body)["pid"])
                    else:
                        failures.append(f"status {status}: {body[:200]!r}")
                except (OSError, ValueError) as e:
                    failures.append(repr(e))
                time.sleep(0.02)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            self.ferrule.send_signal(signal.SIGHUP)
            wait_for(f"{self.label}: SIGHUP: the old workers {sorted(before)} were not replaced",
                     lambda: before <= self.exited_pids() and len(self.generation_pids(1)) == workers,
                     self.wait, self.context)
            after = self.generation_pids(1)
            wait_for(f"{self.label}: SIGHUP: no answer from a new worker {sorted(after)}",
                     lambda: after & set(answers), self.wait, self.context)
        finally:
            stop.set()
            loader.join(self.wait)
        if failures:
            self.fail(f"SIGHUP: {len(failures)} of {len(failures) + len(answers)} requests failed: {failures[:3]}")
        return f"SIGHUP under load: {len(answers)} requests, none failed, workers {sorted(before)} -> {sorted(after)}"

    def timeout_stack(self, path: str, function: str) -> str:
        status, body = self.get(path)
        if status != 504:
            self.fail(f"--timeout: GET {path} answered {status} {body[:200]!r}, not 504")
        wait_for(f"{self.label}: --timeout: no stack naming {function} was logged",
                 lambda: function in self.text(), self.wait, self.context)
        return f"--timeout: 504 and a stack naming {function}()"

    def sigterm_drain(self, seconds: float) -> str:
        marker = self.place.outside / "in-flight"
        marker.unlink(missing_ok=True)
        result = []
        request = threading.Thread(target=lambda: result.append(self.get(f"/slow?s={seconds}")), daemon=True)
        request.start()
        wait_for(f"{self.label}: the slow request did not reach the app", marker.exists, self.wait, self.context)
        self.ferrule.send_signal(signal.SIGTERM)
        request.join(self.wait + seconds)
        if not result or result[0][0] != 200:
            self.fail(f"SIGTERM: the in-flight request was not drained: {result}")
        self.exits_cleanly_after_sigterm()
        return "SIGTERM: the in-flight request finished, exit 0"

    def sigterm_idle(self) -> str:
        self.ferrule.send_signal(signal.SIGTERM)
        self.exits_cleanly_after_sigterm()
        return "SIGTERM: exit 0"

    def exits_cleanly_after_sigterm(self) -> None:
        try:
            code = self.ferrule.wait(self.wait)
        except subprocess.TimeoutExpired:
            self.fail(f"no exit within {self.wait:.0f}s of SIGTERM")
        if code != 0:
            self.fail(f"exit status {code} after SIGTERM")

    def preloaded_without_thread_warning(self) -> str:
        if "app preloaded" not in self.text():
            self.fail("--preload: the zygote did not say it preloaded the app")
        if THREAD_WARNING in self.text():
            self.fail("--preload: a warning about threads the app never started")
        return "--preload: preloaded, no warning about threads"


def install(place: Place, wheel: Path, packages: list, timeout: float) -> None:
    cell = place.cell
    shutil.copy(wheel, place.outside / wheel.name)
    venv = place.inside / "venv"
    what = f"cell {cell.name}: making the venv"
    run(place.cmd([place.python(), "-m", "venv", venv]), what=what, env=place.env(), timeout=timeout,
        capture_output=True, text=True)
    run(place.cmd([venv / "bin" / "python", "-m", "pip", "install", "--quiet", place.inside / wheel.name,
                   *packages]), what=f"cell {cell.name}: pip install", env=place.env(), timeout=timeout,
        capture_output=True, text=True)
    run(place.cmd([venv / "bin" / "ferrule", "--version"]), what=f"cell {cell.name}: ferrule --version",
        env=place.env(), timeout=timeout, capture_output=True, text=True)


def full_set(place: Place, wheel: Path, certs: Path) -> list:
    wait = 30
    install(place, wheel, ["flask>=3,<4", "django>=5,<7"], timeout=600)
    (place.outside / "flask_app.py").write_text(FLASK_APP)
    (place.outside / "django_app.py").write_text(DJANGO_APP)
    for name in ("ca.crt", "ferrule.crt", "ferrule.key"):
        shutil.copy(certs / name, place.outside / name)
    done = []
    with Server(place, "flask", ["--workers", "2", "--timeout", "3", "flask_app:app"], wait) as s:
        s.answer("flask")
        done.append("Flask through nginx")
        done.append(s.sighup_under_load(2))
        done.append(s.timeout_stack("/stuck", "stuck_in_flask_view"))
        done.append(s.sigterm_drain(2))
    with Server(place, "django-preload-tls", ["--workers", "2", "--preload", "django_app:application"], wait,
                tls=certs) as s:
        s.answer("django")
        done.append("Django through nginx suwsgi:// to a tls:// socket")
        done.append(s.preloaded_without_thread_warning())
        done.append(s.sigterm_idle())
    return done


def short_set(place: Place, wheel: Path) -> list:
    # Under qemu a Python start-up takes seconds: the waits are longer, not the checks fewer.
    wait = 180
    install(place, wheel, [], timeout=900)
    (place.outside / "plain_app.py").write_text(PLAIN_APP)
    done = []
    # No --preload here: qemu-user (7.2, Debian bookworm's) refuses prctl(PR_SET_CHILD_SUBREAPER) with EINVAL,
    # which the master needs for --preload, so the emulator cannot run it at all.
    with Server(place, "plain", ["--workers", "2", "plain_app:app"], wait) as s:
        s.answer("plain")
        done.append("a WSGI app through nginx")
        done.append(s.sighup_under_load(2))
        done.append(s.sigterm_drain(2))
    return done


def test_cell(cell: Cell, wheel: Path, certs: Path) -> list:
    place = Place(cell)
    try:
        if cell.root:
            with mounted(cell.root.path):
                return short_set(place, wheel) if cell.emulated else full_set(place, wheel, certs)
        return full_set(place, wheel, certs)
    finally:
        shutil.rmtree(place.outside, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=str(ROOT / "target" / "wheels"), help="where .ci/wheels.py put them")
    p.add_argument("--only", action="append", help="test only this cell, VERSION/ARCH (repeatable)")
    args = p.parse_args()
    wheels_dir = Path(args.wheels).resolve()
    cells = [c for c in MATRIX if not args.only or c.name in args.only]
    timer, results = Timer(), {}
    with tempfile.TemporaryDirectory(prefix="ferrule-wheels-certs-") as certs:
        certs = Path(certs)
        make_certificates(certs)
        for root in dict.fromkeys(c.root for c in cells if c.root):
            with timer.part(f"root {root.name}"):
                try:
                    ensure(root)
                except Failure as e:
                    for cell in cells:
                        if cell.root == root:
                            results[cell.name] = f"FAILED: {e}"
        for cell in cells:
            if cell.name in results:
                continue
            tag = "cp" + cell.version.replace(".", "")
            found = sorted(wheels_dir.glob(f"ferrule-*-{tag}-{tag}-*_{cell.arch}.whl"))
            step(f"cell {cell.name}: {found[0].name if found else '(no wheel)'} on {cell.where()}")
            with timer.part(f"cell {cell.name} ({cell.where()})"):
                try:
                    if len(found) != 1:
                        fail(f"cell {cell.name}: expected one wheel in {wheels_dir}, found {found}")
                    for line in test_cell(cell, found[0], certs):
                        note(line)
                    results[cell.name] = f"passed on {cell.where()}"
                except Failure as e:
                    print(str(e), file=sys.stderr, flush=True)
                    results[cell.name] = f"FAILED: {str(e).splitlines()[0]}"
    timer.report()
    step("the matrix")
    for cell in cells:
        note(f"{cell.name:13} {results[cell.name]}")
    if not args.only:
        for name, why in NOT_RUN.items():
            note(f"{name:13} built and checked, not run: {why}")
    failed = [name for name, result in results.items() if result.startswith("FAILED")]
    if failed:
        fail(f"cells failed: {', '.join(failed)}")
    step(f"wheel tests: {len(results)} cells passed")


if __name__ == "__main__":
    main_guard(main)

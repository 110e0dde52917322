#!/usr/bin/env python3
"""Build ferrule's release wheels and check them; needs no root and no Python of the versions it builds for.

Builds one manylinux2014 wheel per CPython version (3.10 to 3.15) and CPU (x86_64, aarch64) with maturin
and zig (no Docker, no emulator: maturin knows each CPython's build settings, so the interpreters need not
be installed), then checks every wheel: its tag, one extension module for the right CPU, no libpython
dependency, no RUNPATH, stripped, and no glibc symbol newer than 2.17 (what manylinux2014 promises).
Installing and using the wheels is .ci/wheels_test.py's job.

Usage: .ci/wheels.py [--out DIR] [--arch x86_64|aarch64]...   (exits non-zero on the first failure)
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ci_common import ROOT, Timer, fail, main_guard, note, run, step  # noqa: E402

VERSIONS = ["3.10", "3.11", "3.12", "3.13", "3.14", "3.15"]
ARCHES = ["x86_64", "aarch64"]
# What readelf -h says of each CPU's ELF files.
ELF_MACHINE = {"x86_64": "X86-64", "aarch64": "AArch64"}
# manylinux2014 is glibc 2.17 on every CPU.
GLIBC_MAX = (2, 17)
# zig releases after 0.14 broke C builds of crates such as ring and aws-lc-sys; 0.14.1 is the one tested here.
TOOLS = ["maturin>=1.9,<2", "ziglang==0.14.1"]
TOOLS_VENV = ROOT / "target" / "ci-tools"


def tools() -> Path:
    if not (TOOLS_VENV / "bin" / "maturin").exists():
        step(f"installing {' '.join(TOOLS)} into {TOOLS_VENV}")
        run([sys.executable, "-m", "venv", TOOLS_VENV])
        run([TOOLS_VENV / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TOOLS])
    return TOOLS_VENV / "bin"


def rust_target(arch: str) -> str:
    target = f"{arch}-unknown-linux-gnu"
    installed = subprocess.run(["rustup", "target", "list", "--installed"], capture_output=True, text=True)
    if installed.returncode == 0 and target not in installed.stdout.split():
        step(f"rustup target add {target}")
        run(["rustup", "target", "add", target])
    return target


def build(arch: str, out: Path) -> list:
    """One maturin run per CPU builds every version's wheel. Each CPU has its own cargo target directory, so a
    run for one does not throw away the other's build."""
    bin_dir = tools()
    target = rust_target(arch)
    cmd = [bin_dir / "maturin", "build", "--release", "--zig", "--compatibility", "manylinux2014",
           "--target", target, "--out", out]
    for version in VERSIONS:
        cmd += ["-i", f"python{version}"]
    step(f"maturin build --release --zig --compatibility manylinux2014 --target {target} for CPython "
         f"{', '.join(VERSIONS)}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               CARGO_TARGET_DIR=str(ROOT / "target" / "wheel-zig" / arch))
    run(cmd, what=f"building the {arch} wheels", cwd=ROOT, env=env)
    wheels = {}
    for version in VERSIONS:
        tag = "cp" + version.replace(".", "")
        found = sorted(out.glob(f"ferrule-*-{tag}-{tag}-*{arch}.whl"))
        if len(found) != 1:
            fail(f"cell {version}/{arch}: expected one wheel in {out}, found {[w.name for w in found]}")
        wheels[version] = found[0]
    return wheels


def glibc_versions(so: Path) -> set:
    """The GLIBC_x.y versions of the symbols the module imports."""
    symbols = run(["readelf", "--dyn-syms", "--wide", so], capture_output=True, text=True).stdout
    return {tuple(int(n) for n in v.split(".")) for v in re.findall(r"@GLIBC_([0-9.]+)", symbols)}


def check(version: str, arch: str, wheel: Path) -> None:
    cell = f"cell {version}/{arch} ({wheel.name})"
    tag = "cp" + version.replace(".", "")
    _, _, python_tag, abi_tag, platforms = wheel.name.removesuffix(".whl").split("-")
    if (python_tag, abi_tag) != (tag, tag) or f"manylinux2014_{arch}" not in platforms.split("."):
        fail(f"{cell}: not tagged {tag}-{tag}-manylinux2014_{arch}")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.startswith("ferrule/_ferrule") and n.endswith(".so")]
        if len(modules) != 1:
            fail(f"{cell}: expected one extension module, found {modules}")
        if f"-{arch}-linux-gnu" not in modules[0] or f"cpython-{tag[2:]}-" not in modules[0]:
            fail(f"{cell}: the module's name {modules[0]} is not CPython {version}'s for {arch}")
        so = Path(z.extract(modules[0], tmp))
        header = run(["readelf", "-h", so], capture_output=True, text=True).stdout
        dynamic = run(["readelf", "-d", so], capture_output=True, text=True).stdout
        sections = run(["readelf", "-S", so], capture_output=True, text=True).stdout
        machine = re.search(r"Machine:\s*(.*)", header)
        if not machine or ELF_MACHINE[arch] not in machine.group(1):
            fail(f"{cell}: the module is built for {machine and machine.group(1)}, not {arch}")
        if "libpython" in dynamic:
            fail(f"{cell}: the extension links libpython:\n{dynamic}")
        if "RPATH" in dynamic or "RUNPATH" in dynamic:
            fail(f"{cell}: the extension has a RPATH/RUNPATH:\n{dynamic}")
        if ".debug_info" in sections or ".symtab" in sections:
            fail(f"{cell}: the extension is not stripped (it has .debug_info or .symtab)")
        glibc = glibc_versions(so)
        newest = max(glibc, default=(0, 0))
        if newest > GLIBC_MAX:
            too_new = sorted(".".join(map(str, v)) for v in glibc if v > GLIBC_MAX)
            fail(f"{cell}: the extension needs glibc {', '.join(too_new)}, newer than manylinux2014's 2.17")
        size = so.stat().st_size
    note(f"{wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB wheel, {size / 1e6:.2f} MB module, no libpython, "
         f"no RUNPATH, stripped, glibc <= {'.'.join(map(str, newest))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "target" / "wheels"), help="where the wheels go")
    p.add_argument("--arch", action="append", choices=ARCHES, help="build only this CPU (repeatable)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    timer = Timer()
    count = 0
    for arch in args.arch or ARCHES:
        with timer.part(f"build {arch} wheels"):
            wheels = build(arch, out)
        for version, wheel in wheels.items():
            check(version, arch, wheel)
            count += 1
    timer.report()
    step(f"wheels: {count} built and checked in {out}")


if __name__ == "__main__":
    main_guard(main)

"""The Debian roots the wheel tests run interpreters in: made with debootstrap, cached outside the clone
(under /var/cache/ferrule-ci/roots, rebuilt when older than a week or when their package list changed), and
entered with chroot with /proc and /dev mounted for as long as a `mounted()` block lasts. arm64 roots run
through qemu-user-static and binfmt_misc. Everything here needs root."""

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ci_common import fail, note, run, step

CACHE = Path(os.environ.get("FERRULE_CI_CACHE", "/var/cache/ferrule-ci")) / "roots"
MIRROR = "http://deb.debian.org/debian"
MAX_AGE = 7 * 24 * 3600
STAMP = ".ferrule-ci-root"
# Where a root gets a copy of the host's CA bundle; commands in the root point PIP_CERT at it.
ROOT_CA_BUNDLE = "/etc/ferrule-ci/host-ca.crt"
# debootstrap of a root takes minutes (far more under qemu); a stuck mirror must not hang CI for longer.
DEBOOTSTRAP_TIMEOUT = 30 * 60


@dataclass(frozen=True)
class Root:
    suite: str
    arch: str  # Debian's name: amd64, arm64
    packages: tuple

    @property
    def name(self) -> str:
        return f"{self.suite}-{self.arch}"

    @property
    def path(self) -> Path:
        return CACHE / self.name

    def spec(self) -> str:
        return f"{self.suite} {self.arch} {','.join(self.packages)}\n"


def host_setup_for(arch: str) -> None:
    """An arm64 root needs qemu-user-static registered with binfmt_misc (the F flag: the emulator is opened
    when registered, so it works inside a chroot)."""
    if arch == "amd64":
        return
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        step("apt-get install qemu-user-static binfmt-support")
        run(["apt-get", "install", "-y", "--no-install-recommends", "qemu-user-static", "binfmt-support"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"], what="registering qemu-aarch64 with binfmt_misc")


def fresh(root: Root) -> bool:
    stamp = root.path / STAMP
    return stamp.exists() and stamp.read_text() == root.spec() and time.time() - stamp.stat().st_mtime < MAX_AGE


def ensure(root: Root) -> Path:
    """The root's path, made (or remade, if stale) with debootstrap first. A new root is made beside the old
    one and renamed into place, so an interrupted debootstrap never leaves a half-made root in the cache."""
    if os.geteuid() != 0:
        fail(f"root {root.name}: making and entering Debian roots needs root (debootstrap, chroot, mount)")
    host_setup_for(root.arch)
    if not fresh(root):
        if not shutil.which("debootstrap"):
            run(["apt-get", "install", "-y", "--no-install-recommends", "debootstrap"],
                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        step(f"debootstrap {root.name} with {', '.join(root.packages)} (cached in {CACHE})")
        new = root.path.with_name(root.name + ".new")
        unmount_under(new)
        shutil.rmtree(new, ignore_errors=True)
        new.parent.mkdir(parents=True, exist_ok=True)
        run(["debootstrap", f"--arch={root.arch}", "--variant=minbase", f"--include={','.join(root.packages)}",
             root.suite, new, MIRROR], what=f"making root {root.name} (its log: {new}/debootstrap/debootstrap.log)",
            timeout=DEBOOTSTRAP_TIMEOUT,
            stdout=subprocess.DEVNULL)
        (new / STAMP).write_text(root.spec())
        shutil.rmtree(root.path, ignore_errors=True)
        new.rename(root.path)
    # pip inside the root reaches PyPI with the host's resolver (the chroot shares the host's network) and
    # trusts what the host trusts (a TLS-intercepting proxy's CA, for one): ROOT_CA_BUNDLE in the root.
    shutil.copyfile("/etc/resolv.conf", root.path / "etc" / "resolv.conf")
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    inside = root.path / ROOT_CA_BUNDLE.lstrip("/")
    inside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle, inside)
    return root.path


def unmount_under(path: Path) -> None:
    """Detaches whatever is still mounted in `path` (deepest first): a debootstrap that was killed, by its
    timeout say, leaves the /proc it mounted for its second stage, which no rmtree can remove."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        # /proc/self/mounts escapes a space in a mount point as \040.
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        note(f"unmounting {point}, left by an earlier debootstrap")
        subprocess.run(["umount", "-l", point])


@contextlib.contextmanager
def mounted(path: Path, binds: tuple = ()):
    """/proc and /dev (and each (host_dir, dir_in_root) of `binds`) mounted in the root for the block;
    always unmounted after it, in reverse order, also when the block fails."""
    made = []
    try:
        for source, inside in (("proc", "/proc"), ("/dev", "/dev"), *binds):
            target = path / str(inside).lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            if source == "proc":
                run(["mount", "-t", "proc", "proc", target])
            else:
                run(["mount", "--bind", source, target])
            made.append(target)
        yield path
    finally:
        for target in reversed(made):
            if subprocess.run(["umount", target]).returncode != 0:
                # Still busy (a process of the block outlived it): detach now, freed when it exits.
                note(f"umount {target} failed; detaching it lazily")
                subprocess.run(["umount", "-l", target])

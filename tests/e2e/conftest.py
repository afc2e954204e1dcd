"""Fixtures for the end-to-end scenarios: a world-reachable work directory,
a built rootfs, and mounts (shiftfs, overlayfs) that are always unmounted."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import pytest

from shiftfs.mount import is_mounted, mount, unmount

from .rootfs import build_rootfs


@pytest.fixture
def e2e_dir():
    """A 0755 directory under /tmp: container processes (host ids 100000+,
    no host privileges) must be able to reach mount points inside it, which
    pytest's 0700 basetemp does not allow."""
    path = tempfile.mkdtemp(prefix="shiftfs-e2e-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    leftover = [mp for _s, mp, _t in _mounts() if mp == path or mp.startswith(path + "/")]
    for mp in sorted(leftover, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _mounts():
    from shiftfs.mount import mounts
    return mounts()


@pytest.fixture
def rootfs(e2e_dir):
    return build_rootfs(os.path.join(e2e_dir, "lower"))


class Mounts:
    """shiftfs and kernel mounts made by a test, unmounted in reverse order."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stack = contextlib.ExitStack()
        self.count = 0

    def _mountpoint(self, name: str | None) -> str:
        self.count += 1
        mp = os.path.join(self.base, name or f"mnt{self.count}")
        os.makedirs(mp, exist_ok=True)
        os.chmod(mp, 0o755)
        return mp

    def shiftfs(self, lower: str, uidmap, gidmap=None, options=(), name: str | None = None) -> str:
        mp = self._mountpoint(name)
        self.stack.enter_context(mount(lower, mp, uidmap=uidmap,
                                       gidmap=uidmap if gidmap is None else gidmap,
                                       options=list(options)))
        return mp

    def kernel(self, args: list[str], mp: str) -> str:
        subprocess.run(["mount"] + args + [mp], check=True, capture_output=True, text=True)
        self.stack.callback(_kernel_unmount, mp)
        return mp

    def overlay(self, lowerdir: str, name: str, owner: tuple[int, int] = (0, 0)) -> tuple[str, str]:
        """overlayfs over ``lowerdir`` with a fresh upper owned by ``owner`` (host ids:
        the upper's root is the overlay's root); returns (mount point, upper dir)."""
        upper = os.path.join(self.base, name + ".upper")
        work = os.path.join(self.base, name + ".work")
        os.makedirs(upper)
        os.makedirs(work)
        os.chown(upper, *owner)
        os.chmod(upper, 0o755)
        mp = self._mountpoint(name)
        self.kernel(["-t", "overlay", "overlay", "-o",
                     f"lowerdir={lowerdir},upperdir={upper},workdir={work}"], mp)
        return mp, upper

    def close(self) -> None:
        self.stack.close()


def _kernel_unmount(mp: str) -> None:
    if is_mounted(mp, None):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)


@pytest.fixture
def mounts(e2e_dir):
    m = Mounts(e2e_dir)
    try:
        yield m
    finally:
        m.close()
        for _s, mp, _t in _mounts():
            if mp.startswith(e2e_dir + "/"):  # last resort: never leave a mount behind
                try:
                    unmount(mp, lazy=True)
                except OSError:
                    subprocess.run(["umount", "-l", mp], capture_output=True)

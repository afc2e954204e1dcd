"""Fixtures shared by the mounted tests: real FUSE mounts, always unmounted."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import pytest
from pathlib import Path

from shiftfs.mount import is_mounted, mount, unmount

from tests.fuse_requests import RequestCounter
from tests.daemon import loop_ext4
from tests.tables import STD


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("the mounted tests need root and /dev/fuse; CI must provide them")
    skip = pytest.mark.skip(reason="needs root and /dev/fuse (run as root, as CI does)")
    for item in items:
        if "needs_root" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_root: needs root and /dev/fuse")


@pytest.fixture
def workdir():
    """A scratch directory every caller can reach (pytest's tmp_path sits
    under a 0700 directory, which would turn every non-root test into EACCES)."""
    path = tempfile.mkdtemp(prefix="shiftfs-test-", dir="/tmp")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ext4_lower(workdir):
    """A lower on a private ext4 (a 64 MiB loop image), for what depends on
    ext4's file handles (the inode's number in them) wherever /tmp is
    (tmpfs in CI's debootstrap root); unmounted after the test."""
    with loop_ext4(workdir / "ext4-lower", "64M") as path:
        os.rmdir(path / "lost+found")  # a lower as a test makes it: empty
        yield path


@pytest.fixture
def lower(workdir):
    path = workdir / "lower"
    path.mkdir()
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def mounter(workdir):
    """mounter(lower, uidmap=[...], gidmap=[...], options=[...]) -> mount point.
    Every mount is unmounted at teardown, also when the test failed."""
    stack = contextlib.ExitStack()
    count = [0]

    def make(lower_dir, uidmap=STD, gidmap=None, options=()):
        count[0] += 1
        mp = workdir / f"mnt{count[0]}"
        mp.mkdir()
        stack.enter_context(mount(str(lower_dir), str(mp), uidmap=uidmap,
                                  gidmap=uidmap if gidmap is None else gidmap,
                                  options=list(options)))
        return mp

    try:
        yield make
    finally:
        stack.close()
        for i in range(1, count[0] + 1):  # last resort: never leave a mount behind
            mp = workdir / f"mnt{i}"
            if is_mounted(str(mp), None):
                unmount(str(mp), lazy=True)


@pytest.fixture
def shifted(lower, mounter):
    """The standard case: lower 0..65535 seen as 100000..165535."""
    return mounter(lower)


@pytest.fixture
def counter():
    """Requests a mount receives (fuse_requests.RequestCounter): ``start(dev)``,
    then ``stop()`` for the counts by opcode; its tracefs instance goes at
    teardown."""
    c = RequestCounter(buffer_kb=8192)
    try:
        yield c
    finally:
        with contextlib.suppress(OSError):
            c.stop()
        c.close()

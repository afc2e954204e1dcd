"""Fixtures shared by the mounted tests: real FUSE mounts, always unmounted."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from pathlib import Path

from shiftfs.mount import is_mounted, mount, unmount
from shiftfs.supervisor import read_status

from tests.fuse_requests import RequestCounter
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


def limited_fds(count: int) -> list[str]:
    """The command prefix that runs a root daemon under RLIMIT_NOFILE
    ``count``: without CAP_SYS_RESOURCE (gone from its bounding set) it
    cannot raise the limit again, as it otherwise does at start."""
    return ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource",
            "prlimit", f"--nofile={count}:{count}", "--"]


def server_pid(mountpoint) -> int:
    """The pid of the server serving ``mountpoint`` now: the process that
    holds the node fds, marks and open files (the one a test signals or
    measures); the process a test starts is its supervisor."""
    status = read_status(str(mountpoint))
    assert status is not None and status["server"] > 0, f"no server for {mountpoint}"
    return status["server"]


@contextlib.contextmanager
def foreground_daemon(lower, mountpoint, *args, log, fd_limit=None):
    """``shiftfs -f`` with its stderr in the file ``log`` (and RLIMIT_NOFILE
    ``fd_limit``, if given): yields once the mount is live, and always
    unmounts and reaps the daemon."""
    prefix = limited_fds(fd_limit) if fd_limit else []
    with open(log, "wb") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "shiftfs", "-f", "-q", *args,
                                 str(lower), str(mountpoint)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(str(mountpoint)):
            assert proc.poll() is None, Path(log).read_text()
            assert time.monotonic() < deadline, "shiftfs did not mount within 20 s"
            time.sleep(0.01)
        yield proc
    finally:
        if is_mounted(str(mountpoint), None):
            unmount(str(mountpoint))
        proc.wait(timeout=20)


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

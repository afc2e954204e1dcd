"""READ replies spliced from the lower fd (shiftfs/splice.py), where the
daemon serves the data itself: ``-o passthrough=off`` here, and a rootless
mount. Reads through the mount give exactly the lower's bytes, whatever
the offset, size and EOF, also with a file cut short between reads and
with many readers at once; and the big replies did go through splice(2)
to /dev/fuse: the syscalls:sys_enter_splice tracepoint, counted for the
server's threads (none with SHIFTFS_SPLICE=off, the control)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import threading

import pytest

from tests import rootless
from tests.daemon import foreground_daemon, seen_within, server_pid
from tests.fuse_requests import TRACE
from tests.procs import family
from tests.tables import STD, args

pytestmark = pytest.mark.needs_root

KIB, MIB = 1 << 10, 1 << 20


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@contextlib.contextmanager
def _mounted(lower, workdir, splice="on"):
    mnt = workdir / f"mnt-{splice}"
    mnt.mkdir()
    env = dict(os.environ, SHIFTFS_SPLICE=splice)
    with foreground_daemon(lower, mnt, *args(STD), "-o", "passthrough=off", env=env):
        yield mnt


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:  # gone since it was listed
        return ""


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # gone since it was listed
        return []


def _link(pid: int, fd: str) -> str:
    """Where the process's fd points ("" if closed since it was listed)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return ""


class SpliceCounter:
    """syscalls:sys_enter_splice in a private tracefs instance: the
    splices into the /dev/fuse fd of the daemon's processes (``pid`` and
    those below it but fusermount3), by length. By fd number, not by the
    threads' ids: tracefs shows ids of the first pid namespace, and the
    tests may run in another (CI's debootstrap root)."""

    def __init__(self, pid: int):
        fuse = {int(fd) for p in family(pid) if "fusermount" not in _comm(p)
                for fd in _fds(p) if _link(p, fd) == "/dev/fuse"}
        assert fuse, f"no process of {pid}'s holds /dev/fuse"
        self.inst = os.path.join(TRACE, "instances", f"shiftfs-splice-{os.getpid()}-{id(self)}")
        os.mkdir(self.inst)
        self.ev = os.path.join(self.inst, "events", "syscalls", "sys_enter_splice")
        self._w(os.path.join(self.ev, "filter"), " || ".join(f"fd_out == {fd}" for fd in fuse))
        self._w(os.path.join(self.ev, "enable"), "1")

    def _w(self, path, text):
        with open(path, "w") as f:
            f.write(text)

    def stop(self) -> list[int]:
        """The lengths spliced to /dev/fuse by the process's threads."""
        self._w(os.path.join(self.ev, "enable"), "0")
        lens = []
        with open(os.path.join(self.inst, "trace")) as f:
            for line in f:
                m = re.search(r"sys_splice\(.*len: (0x[0-9a-f]+|\d+)", line)
                if m and "fusermount" not in line.split("-", 1)[0]:
                    lens.append(int(m.group(1), 0))
        return lens

    def close(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)


@contextlib.contextmanager
def splices(pid: int):
    counter = SpliceCounter(pid)
    lens: list[int] = []
    try:
        yield lens
    finally:
        with contextlib.suppress(OSError):
            lens += counter.stop()
        counter.close()


def _direct(path):
    """An O_DIRECT open: every read(2) is one READ of its size, past the
    mount's page cache."""
    return os.open(path, os.O_RDONLY | os.O_DIRECT)


def _check_reads(lower, mnt, seed=1):
    """Sequential, random, crossing and past EOF: each read through the
    mount equals the lower's pread at the same place."""
    data = _data(8 * MIB + 1234, seed)
    (lower / "big").write_bytes(data)
    (lower / "empty").write_bytes(b"")
    assert (mnt / "big").read_bytes() == data  # buffered: the kernel's readahead sizes
    fd = _direct(mnt / "big")
    try:
        rnd = random.Random(seed)
        places = [(rnd.randrange(len(data)), rnd.choice([1, 4095, 32 * KIB, 100_000, MIB]))
                  for _ in range(60)]
        places += [(len(data) - 10, 64 * KIB), (len(data) - 5000, MIB),  # crossing EOF: short
                   (len(data), 64 * KIB), (len(data) + MIB, MIB), (0, MIB)]  # past it: empty
        for off, size in places:
            assert os.pread(fd, size, off) == data[off:off + size], (off, size)
    finally:
        os.close(fd)
    fd = _direct(mnt / "empty")
    try:
        assert os.pread(fd, MIB, 0) == b"" and os.pread(fd, 64 * KIB, 4096) == b""
    finally:
        os.close(fd)


def test_reads_give_the_lower_bytes(lower, workdir):
    with _mounted(lower, workdir) as mnt:
        _check_reads(lower, mnt)


def test_a_file_cut_short_between_reads(lower, workdir):
    data = _data(4 * MIB, 2)
    (lower / "f").write_bytes(data)
    with _mounted(lower, workdir) as mnt:
        fd = _direct(mnt / "f")
        try:
            assert os.pread(fd, MIB, MIB) == data[MIB:2 * MIB]
            subprocess.run(["truncate", "-s", str(MIB + 300), str(lower / "f")], check=True)
            # the cut shows once the watcher's invalidation is in (a change
            # behind the mount is not synchronous): a read that races it
            # sees the old size, and its buffered tail past a short direct
            # read is zeros where the kernel skips the size update (the
            # invalidation bumped attr_version meanwhile)
            assert seen_within(lambda: os.fstat(fd).st_size == MIB + 300, 5.0) is not None
            for off, size in ((MIB, MIB), (0, 2 * MIB), (MIB + 300, 4096), (3 * MIB, MIB)):
                assert os.pread(fd, size, off) == data[:MIB + 300][off:off + size], (off, size)
        finally:
            os.close(fd)


def test_many_readers_of_different_files_get_their_own_bytes(lower, workdir):
    files = {f"f{i}": _data(3 * MIB + i * 777, 10 + i) for i in range(8)}
    for name, data in files.items():
        (lower / name).write_bytes(data)
    wrong = []
    with _mounted(lower, workdir) as mnt:
        def reader(name, data, seed):
            rnd = random.Random(seed)
            fd = _direct(mnt / name)
            try:
                for _ in range(40):
                    off, size = rnd.randrange(len(data)), rnd.choice([40 * KIB, 200 * KIB, MIB])
                    if os.pread(fd, size, off) != data[off:off + size]:
                        wrong.append((name, off, size))
            finally:
                os.close(fd)
            if (mnt / name).read_bytes() != data:
                wrong.append((name, "whole"))
        threads = [threading.Thread(target=reader, args=(n, d, i)) for i, (n, d) in
                   enumerate(files.items())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []


@pytest.mark.parametrize("splice", ["on", "off"])
def test_big_replies_are_spliced_and_small_ones_are_not(lower, workdir, splice):
    """On: every READ of 256 KiB is one splice of its reply (header and data)
    to /dev/fuse, and a 4 KiB one none; off (the control): no splice at all."""
    data = _data(4 * MIB, 3)
    (lower / "f").write_bytes(data)
    with _mounted(lower, workdir, splice) as mnt:
        with splices(server_pid(mnt)) as lens:
            fd = _direct(mnt / "f")
            try:
                got = b"".join(os.pread(fd, 256 * KIB, off) for off in range(0, len(data), 256 * KIB))
                small = [os.pread(fd, 4 * KIB, off) for off in range(0, 64 * KIB, 4 * KIB)]
            finally:
                os.close(fd)
    assert got == data and b"".join(small) == data[:64 * KIB]
    if splice == "on":
        assert lens.count(16 + 256 * KIB) == 16, lens
        assert 16 + 4 * KIB not in lens
    else:
        assert lens == []


def test_rootless_reads_are_spliced_and_exact(lower, workdir):
    """A daemon without privileges (no passthrough; pipes of at most
    /proc/sys/fs/pipe-max-size): the same reads, and its replies spliced."""
    with rootless.mount_as_user(lower, workdir) as (pid, mnt, _log):
        with splices(pid) as lens:
            _check_reads(lower, mnt, seed=4)
    assert lens.count(16 + 100_000) >= 1, lens

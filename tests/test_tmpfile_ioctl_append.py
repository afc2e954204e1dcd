"""Requests the libfuse-era daemon did not serve, held against a kernel
idmapped mount of the same kind of tree (issue 20, items 2 and 4):

- O_TMPFILE (FUSE_TMPFILE): the file is born with its creator's owner, and
  linkat gives it a name through the mount;
- the inode-flag ioctls (FS_IOC_GETFLAGS, FS_IOC_FSGETXATTR: FUSE_IOCTL)
  read the lower's flags; setting the immutable flag stays EPERM for a
  mapped user, as the kernel refuses it;
- O_APPEND records written by two users through two mounts of one lower
  (the sharing case) stay whole: one write() is one append."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import subprocess
import threading

import pytest

from tests.callers import call_as
from tests.tables import ROOT_KEPT, tuples, upper_of
from tests.oracle.kernel_idmap import idmapped_mount

pytestmark = pytest.mark.needs_root

USER = upper_of(1000, ROOT_KEPT)  # 101000
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_NODUMP_FL = 0x00000040
FS_IMMUTABLE_FL = 0x00000010


@contextlib.contextmanager
def both(lower, workdir, mounter):
    """(shiftfs mount, kernel idmapped mount) of two equal copies of ``lower``."""
    twin = workdir / "twin"
    subprocess.run(["cp", "-a", str(lower), str(twin)], check=True)
    kmnt = workdir / "kernel"
    kmnt.mkdir()
    ext = tuples(ROOT_KEPT)
    with idmapped_mount(str(twin), str(kmnt), ext, ext):
        yield mounter(lower, uidmap=ROOT_KEPT), kmnt, twin


_libc = ctypes.CDLL(None, use_errno=True)
AT_EMPTY_PATH = 0x1000


def _tmpfile_then_link(d: str) -> tuple:
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"born unnamed")
        st = os.fstat(fd)
        # flink(): the opener itself may name it (Linux 6.10+)
        if _libc.linkat(fd, b"", -100, os.path.join(d, "named").encode(), AT_EMPTY_PATH):
            raise OSError(ctypes.get_errno(), "linkat")
    finally:
        os.close(fd)
    named = os.stat(os.path.join(d, "named"))
    with open(os.path.join(d, "named"), "rb") as f:
        data = f.read()
    return st.st_uid, st.st_gid, st.st_nlink, named.st_uid, named.st_mode & 0o777, data


def test_o_tmpfile_is_born_the_callers_and_links_through_the_mount(lower, workdir, mounter):
    (lower / "d").mkdir()
    os.chown(lower / "d", 1000, 1000)
    with both(lower, workdir, mounter) as (mnt, kmnt, twin):
        ours = call_as(_tmpfile_then_link, str(mnt / "d"), uid=USER, gid=USER, umask=0o022)
        kernel = call_as(_tmpfile_then_link, str(kmnt / "d"), uid=USER, gid=USER, umask=0o022)
        assert ours == kernel == (USER, USER, 0, USER, 0o640, b"born unnamed")
        st, kst = os.stat(lower / "d" / "named"), os.stat(twin / "d" / "named")
        assert (st.st_uid, st.st_gid) == (kst.st_uid, kst.st_gid) == (1000, 1000)
        assert sorted(os.listdir(lower / "d")) == ["named"]  # nothing else left behind


def _getflags(path: str) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))[0]
        fsx = struct.unpack("IIIII8x", fcntl.ioctl(fd, FS_IOC_FSGETXATTR, b"\0" * 28))
        return flags & FS_NODUMP_FL, fsx[0] & 0x80  # FS_XFLAG_NODUMP
    finally:
        os.close(fd)


def _set_immutable(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", FS_IMMUTABLE_FL))
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def test_inode_flag_ioctls_read_the_lower_and_chattr_i_stays_refused(lower, workdir, mounter):
    (lower / "f").write_text("x")
    os.chown(lower / "f", 1000, 1000)
    with both(lower, workdir, mounter) as (mnt, kmnt, twin):
        for tree in (lower, twin):  # cp -a does not copy inode flags
            subprocess.run(["chattr", "+d", str(tree / "f")], check=True)
        assert _getflags(str(mnt / "f")) == _getflags(str(kmnt / "f")) == (FS_NODUMP_FL, 0x80)
        ours = call_as(_set_immutable, str(mnt / "f"), uid=USER, gid=USER)
        kernel = call_as(_set_immutable, str(kmnt / "f"), uid=USER, gid=USER)
        assert ours == kernel == errno.EPERM
        assert subprocess.run(["lsattr", str(lower / "f")], capture_output=True,
                              text=True).stdout.split()[0].count("i") == 0


RECORD = 100
RECORDS = 1500


def _append(path: str, tag: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(RECORDS):
            rec = tag + b"%05d" % i
            os.write(fd, rec.ljust(RECORD - 1, b" ") + b"\n")
    finally:
        os.close(fd)
    return RECORDS


def _torn(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n")[:-1]
               if len(line) != RECORD - 1 or line[:1] not in (b"A", b"B")
               or b"A" in line[1:] or b"B" in line[1:])


def test_o_append_records_stay_whole_between_two_mounts_of_one_lower(lower, mounter):
    (lower / "log").write_bytes(b"")
    os.chown(lower / "log", 1000, 1000)
    a, b = mounter(lower, uidmap=ROOT_KEPT), mounter(lower, uidmap=ROOT_KEPT)
    out = {}

    def writer(mp, tag):
        out[tag] = call_as(_append, str(mp / "log"), tag, uid=USER, gid=USER)

    threads = [threading.Thread(target=writer, args=(a, b"A")),
               threading.Thread(target=writer, args=(b, b"B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == {b"A": RECORDS, b"B": RECORDS}
    data = (lower / "log").read_bytes()
    assert len(data) == 2 * RECORDS * RECORD
    assert _torn(data) == 0

"""FUSE passthrough (Linux 6.9+, a root daemon; negotiated by shiftfs's own
INIT reply, whatever libfuse is installed): the opens of
a regular file are served by the kernel from the lower file, so no READ or
WRITE request reaches the daemon; the files the daemon must see (set-id
bits, file capabilities) and lowers the kernel refuses as
backing files (overlayfs) still go through it. Requests are counted with
the fuse:fuse_request_send tracepoint (fuse_requests.py).

On a kernel without passthrough the tests that need it say so and are
skipped; the others hold on both."""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import subprocess
import threading

import pytest

from tests.callers import call_as
from tests.tables import ROOT_KEPT, STD, args, tuples, upper_of

pytestmark = pytest.mark.needs_root


def _kernel_has_passthrough() -> bool:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 9)


needs_passthrough = pytest.mark.skipif(
    not _kernel_has_passthrough(),
    reason=f"FUSE passthrough needs Linux 6.9 (here Linux {platform.release()})")

MIB = 1 << 20
USER = upper_of(1000, ROOT_KEPT)  # 101000 (host root kept as 0)


@contextlib.contextmanager
def counting(counter, mnt):
    counts = {}
    counter.start(os.stat(mnt).st_dev)
    try:
        yield counts
    finally:
        counts.update(counter.stop())


def _pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def _read_all(path, chunk=MIB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while True:
            b = f.read(chunk)
            if not b:
                return b"".join(parts)
            parts.append(b)


def _io_both_ways(lower, mnt, name="data"):
    """Read a lower-made file through the mount and write another one; both
    compare equal on the other side."""
    data = _pattern(8 * MIB, 1)
    (lower / name).write_bytes(data)
    got = _read_all(mnt / name)
    new = _pattern(6 * MIB + 123, 2)
    with open(mnt / (name + ".new"), "wb", buffering=0) as f:
        for i in range(0, len(new), MIB):
            f.write(new[i:i + MIB])
    return got == data, (lower / (name + ".new")).read_bytes() == new


@needs_passthrough
def test_reads_and_writes_of_a_plain_file_do_not_reach_the_daemon(lower, mounter, counter):
    mnt = mounter(lower, ROOT_KEPT)
    with counting(counter, mnt) as counts:
        read_ok, write_ok = _io_both_ways(lower, mnt)
    assert read_ok and write_ok
    assert counts.get("FUSE_OPEN", 0) + counts.get("FUSE_CREATE", 0) >= 2
    assert counts.get("FUSE_READ", 0) == 0, counts
    assert counts.get("FUSE_WRITE", 0) == 0, counts


def test_without_passthrough_the_daemon_serves_the_data(lower, mounter, counter):
    """The control: the same workload with -o passthrough=off (and on
    libfuse 3.14, where there is none) is READs and WRITEs."""
    mnt = mounter(lower, ROOT_KEPT, options=["-o", "passthrough=off"])
    with counting(counter, mnt) as counts:
        read_ok, write_ok = _io_both_ways(lower, mnt)
    assert read_ok and write_ok
    assert counts.get("FUSE_READ", 0) > 0, counts
    assert counts.get("FUSE_WRITE", 0) > 0, counts


@needs_passthrough
def test_sparse_and_large_files_keep_their_holes_and_data(lower, mounter):
    mnt = mounter(lower, ROOT_KEPT)
    with open(lower / "sparse", "wb") as f:
        f.seek(3 << 30)  # 3 GiB of hole, then data
        f.write(b"tail")
        f.seek(1 << 30)
        f.write(b"middle")
    with open(mnt / "sparse", "rb") as f:
        f.seek((1 << 30) - 4)
        assert f.read(10) == b"\0\0\0\0middle"
        f.seek(3 << 30)
        assert f.read(10) == b"tail"
        f.seek(12345)
        assert f.read(4096) == bytes(4096)
    # a hole made through the mount stays a hole on the lower
    with open(mnt / "made-sparse", "wb") as f:
        f.seek(2 << 30)
        f.write(b"x")
    st = os.stat(lower / "made-sparse")
    assert st.st_size == (2 << 30) + 1 and st.st_blocks * 512 < MIB
    fd = os.open(mnt / "made-sparse", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) >= (2 << 30) - 4096
    finally:
        os.close(fd)


@needs_passthrough
def test_mmap_reads_and_shared_writes_reach_the_lower(lower, mounter, counter):
    data = _pattern(4 * MIB, 3)
    (lower / "m").write_bytes(data)
    mnt = mounter(lower, ROOT_KEPT)
    with counting(counter, mnt) as counts:
        with open(mnt / "m", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            assert m[:] == data
            m[MIB:MIB + 5] = b"HELLO"
            m.flush()
    assert (lower / "m").read_bytes() == data[:MIB] + b"HELLO" + data[MIB + 5:]
    assert counts.get("FUSE_READ", 0) == 0 and counts.get("FUSE_WRITE", 0) == 0, counts


def _o_direct_read_then_write(path, data: bytes, first: bytes) -> mmap.mmap:
    """Through one O_DIRECT fd of ``path`` (holding ``data``, 2 MiB): its
    second MiB read and checked, then ``first`` written over its first
    MiB. The page-aligned buffer, holding ``first``, is returned."""
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], MIB) == MIB
        assert buf[:] == data[MIB:]
        buf[:] = first
        assert os.pwritev(fd, [buf], 0) == MIB
    finally:
        os.close(fd)
    return buf


@needs_passthrough
def test_o_direct_reads_and_writes(lower, mounter, counter):
    data = _pattern(2 * MIB, 4)
    (lower / "d").write_bytes(data)
    mnt = mounter(lower, ROOT_KEPT)
    with counting(counter, mnt) as counts:
        _o_direct_read_then_write(mnt / "d", data, _pattern(MIB, 5))
    assert (lower / "d").read_bytes() == _pattern(MIB, 5) + data[MIB:]
    assert counts.get("FUSE_READ", 0) == 0 and counts.get("FUSE_WRITE", 0) == 0, counts


@pytest.mark.parametrize("passthrough", ["off", "auto"])
def test_o_direct_through_the_daemon_and_new_files(lower, mounter, passthrough):
    """O_DIRECT opens and creates, with the daemon serving the data (any
    libfuse; passthrough=off) or passthrough where there is one: the
    daemon's buffers are not aligned as O_DIRECT on the lower wants, so the
    data must still arrive (it gave EINVAL)."""
    data = _pattern(2 * MIB, 6)
    (lower / "d").write_bytes(data)
    mnt = mounter(lower, ROOT_KEPT, options=["-o", f"passthrough={passthrough}"])
    buf = _o_direct_read_then_write(mnt / "d", data, _pattern(MIB, 7))
    assert (lower / "d").read_bytes() == _pattern(MIB, 7) + data[MIB:]
    fd = os.open(mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        assert os.pwritev(fd, [buf], 0) == MIB
    finally:
        os.close(fd)
    assert (lower / "new").read_bytes() == _pattern(MIB, 7)


@needs_passthrough
def test_concurrent_writers_and_readers_through_several_opens(lower, mounter):
    """Four writers, each on its own fd and its own MiB, and readers on
    other fds meanwhile: every open of the inode shares one backing file."""
    size = 4 * MIB
    (lower / "c").write_bytes(bytes(size))
    mnt = mounter(lower, ROOT_KEPT)
    errors = []

    def writer(i):
        try:
            with open(mnt / "c", "r+b", buffering=0) as f:
                for _round in range(8):
                    f.seek(i * MIB)
                    f.write(_pattern(MIB, 10 + i))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def reader():
        try:
            for _round in range(8):
                got = _read_all(mnt / "c")
                assert len(got) == size
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    want = b"".join(_pattern(MIB, 10 + i) for i in range(4))
    assert _read_all(mnt / "c") == want
    assert (lower / "c").read_bytes() == want


@needs_passthrough
def test_files_the_daemon_must_see_are_not_passed_through(lower, mounter, counter):
    """Set-uid, set-gid with group exec, a file capability: their data
    goes through the daemon (READ requests arrive). A plain file and a
    frozen one (its owner outside the table: the kernel refuses it for
    writing, so nothing the daemon must see is written) are passed
    through."""
    data = _pattern(MIB, 6)
    for name, mode in (("suid", 0o4755), ("sgid", 0o2775), ("cap", 0o755), ("frozen", 0o644),
                       ("plain", 0o644)):
        (lower / name).write_bytes(data)
        os.chmod(lower / name, mode)
    subprocess.run(["setcap", "cap_net_raw+ep", str(lower / "cap")], check=True)
    os.chown(lower / "frozen", 70000, 70000)  # outside the table: frozen
    mnt = mounter(lower, ROOT_KEPT)
    for name in ("suid", "sgid", "cap"):
        with counting(counter, mnt) as counts:
            assert _read_all(mnt / name) == data
        assert counts.get("FUSE_READ", 0) > 0, (name, counts)
    for name in ("plain", "frozen"):
        with counting(counter, mnt) as counts:
            assert _read_all(mnt / name) == data
        assert counts.get("FUSE_READ", 0) == 0, (name, counts)
    with pytest.raises(PermissionError):
        open(mnt / "frozen", "r+b").close()


@needs_passthrough
def test_a_write_by_a_user_still_clears_set_uid_on_a_file_open_for_passthrough(lower, mounter):
    """A file passed through since its first open and made set-uid while
    open: the next opens follow the first (the kernel wants one mode per
    inode), and the kernel itself clears the bit on a write by a caller
    without CAP_FSETID, as on an idmapped mount."""
    (lower / "f").write_bytes(b"0" * 4096)
    os.chmod(lower / "f", 0o666)
    os.chown(lower / "f", 1000, 1000)
    mnt = mounter(lower, ROOT_KEPT)
    holder = open(mnt / "f", "rb")  # the first open: passed through
    try:
        os.chmod(mnt / "f", 0o4777)

        def write():
            with open(mnt / "f", "r+b", buffering=0) as f:
                f.write(b"user")
        call_as(write, uid=USER, gid=USER)
        assert holder.read(4) == b"user"
    finally:
        holder.close()
    st = os.stat(lower / "f")
    assert st.st_mode & 0o7777 == 0o777
    assert (lower / "f").read_bytes()[:4] == b"user"


@needs_passthrough
def test_an_overlayfs_lower_is_served_by_the_daemon(workdir, mounter, counter):
    """The kernel refuses a backing file on a stacked filesystem (shiftfs
    keeps its own stacking depth at 1 so that overlayfs can sit on it):
    the opens fall back to READ and WRITE, with the same data."""
    parts = {p: workdir / p for p in ("ovl-lower", "ovl-upper", "ovl-work", "ovl")}
    for p in parts.values():
        p.mkdir()
    data = _pattern(MIB, 7)
    (parts["ovl-lower"] / "f").write_bytes(data)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={parts['ovl-lower']},upperdir={parts['ovl-upper']},"
                    f"workdir={parts['ovl-work']}", str(parts["ovl"])], check=True)
    try:
        mnt = mounter(parts["ovl"], ROOT_KEPT)
        with counting(counter, mnt) as counts:
            assert _read_all(mnt / "f") == data
            (mnt / "g").write_bytes(data)
        assert counts.get("FUSE_READ", 0) > 0, counts
        assert (parts["ovl-upper"] / "g").read_bytes() == data
    finally:
        subprocess.run(["umount", "-l", str(parts["ovl"])], check=False)


@needs_passthrough
def test_an_overlayfs_mount_can_stack_on_a_passthrough_shiftfs(workdir, lower, mounter):
    """Passthrough raises shiftfs's stacking depth by one, to 1: overlayfs
    (depth 2, the most the kernel allows) still mounts over it."""
    (lower / "f").write_bytes(b"below")
    mnt = mounter(lower, ROOT_KEPT)
    up, wk, merged = workdir / "up", workdir / "wk", workdir / "merged"
    for p in (up, wk, merged):
        p.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt},upperdir={up},workdir={wk}", str(merged)], check=True)
    try:
        assert (merged / "f").read_bytes() == b"below"
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_passthrough_option_values(lower, mounter, workdir):
    import sys
    r = subprocess.run([sys.executable, "-m", "shiftfs", "-o", "passthrough=yes",
                        *args(STD), str(lower), str(workdir)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["shiftfs: -o passthrough=yes: expected auto or off"]


@needs_passthrough
def test_a_passed_through_binary_runs_and_its_reads_skip_the_daemon(lower, mounter, counter):
    """exec maps the file: with passthrough the mapping is the lower file's."""
    import shutil
    shutil.copy2("/bin/echo", lower / "echo")
    mnt = mounter(lower, ROOT_KEPT)
    with counting(counter, mnt) as counts:
        out = subprocess.run([str(mnt / "echo"), "ran"], capture_output=True, text=True, check=True)
    assert out.stdout == "ran\n"
    assert counts.get("FUSE_OPEN", 0) >= 1 and counts.get("FUSE_READ", 0) == 0, counts


# ---- set-id clearing on a passed-through file, against the kernel ---------------

OTHER = upper_of(1001, ROOT_KEPT)  # 101001: neither owner nor group


def _setid_after_write(root_dir, mode, uid, gid):
    """A plain file opened (so passed through on shiftfs), made ``mode``
    while open, then written by ``uid:gid``: the mode bits that remain."""
    path = root_dir / "f"
    holder = open(path, "rb")
    try:
        os.chmod(path, mode)

        def write():
            with open(path, "r+b", buffering=0) as f:
                f.write(b"w")
        if uid == 0:
            write()
        else:
            call_as(write, uid=uid, gid=gid)
    finally:
        holder.close()
    return os.stat(path).st_mode & 0o7777


@pytest.mark.parametrize("mode", [0o4777, 0o2777, 0o2767, 0o6777, 0o6767])
@pytest.mark.parametrize("who", ["owner", "other", "root"])
@pytest.mark.parametrize("passthrough", [pytest.param("auto", marks=needs_passthrough), "off"])
def test_set_id_clearing_on_an_open_file_agrees_with_the_kernel(workdir, mounter, mode, who,
                                                                passthrough):
    """The same with and without passthrough (and on libfuse 3.14)."""
    from tests.oracle.kernel_idmap import idmapped_mount
    uid = {"owner": USER, "other": OTHER, "root": 0}[who]
    results = {}
    for kind in ("shiftfs", "kernel"):
        low = workdir / f"lower-{kind}"
        low.mkdir()
        os.chmod(low, 0o755)
        (low / "f").write_bytes(b"0" * 4096)
        os.chmod(low / "f", 0o666)
        os.chown(low / "f", 1000, 1000)
        if kind == "shiftfs":
            mnt = mounter(low, ROOT_KEPT, options=["-o", f"passthrough={passthrough}"])
            results[kind] = _setid_after_write(mnt, mode, uid, uid)
        else:
            mnt = workdir / "mnt-kernel"
            mnt.mkdir()
            ext = tuples(ROOT_KEPT)
            with idmapped_mount(str(low), str(mnt), ext, ext):
                results[kind] = _setid_after_write(mnt, mode, uid, uid)
    assert results["shiftfs"] == results["kernel"], results

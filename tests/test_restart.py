"""A daemon that can die (issue 21): SIGKILL of the server, or an upgrade,
costs the callers on the mount nothing. The supervisor keeps /dev/fuse,
the node journal and the open files; a new server takes over and the
kernel resends what the dead one had read (FUSE_NOTIFY_RESEND, Linux 6.9).

The workload is the issue's: a mapped user creates a 64 KiB file, writes
it, fsyncs, reads it back and compares, and stats it, in a loop, while it
holds one file open and has its cwd in the mount."""

from __future__ import annotations

import errno
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests import rootless
from tests.callers import call_as
from tests.procs import children, fd_targets
from tests.tables import ROOT_KEPT, upper_of
from shiftfs.supervisor import CLOSE, FLUSHED, MSG, FdStore, NodeJournal, read_status

pytestmark = [
    pytest.mark.needs_root,
    pytest.mark.skipif(tuple(int(x) for x in platform.release().split(".")[:2]) < (6, 9),
                       reason=f"FUSE_NOTIFY_RESEND needs Linux 6.9 (here {platform.release()})"),
]

USER = upper_of(1000, ROOT_KEPT)  # 101000
KIB64 = 64 * 1024


def _loop(mnt: str, seconds: float) -> dict:
    """The caller's side: counts iterations and failures (with their errors)."""
    os.chdir(os.path.join(mnt, "w"))  # cwd in the mount
    held = os.open("held", os.O_RDWR | os.O_CREAT, 0o644)
    done = failed = 0
    errors = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        data = os.urandom(KIB64)
        name = f"f{i % 50}"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
                if os.pread(fd, KIB64, 0) != data:
                    raise AssertionError("read back differs")
            finally:
                os.close(fd)
            if os.stat(name).st_size != KIB64:
                raise AssertionError("size differs")
            os.pwrite(held, data[:16], 0)
            if os.pread(held, 16, 0) != data[:16]:
                raise AssertionError("held fd differs")
            done += 1
        except (OSError, AssertionError) as e:
            failed += 1
            errors.append(repr(e))
    os.close(held)
    return {"done": done, "failed": failed, "errors": errors[:5], "cwd": os.getcwd()}


def _running_loop(mnt, seconds):
    out = {}
    t = threading.Thread(target=lambda: out.update(
        call_as(_loop, str(mnt), seconds, uid=USER, gid=USER, call_timeout=seconds + 60)))
    t.start()
    return t, out


@pytest.fixture
def served(lower, mounter):
    (lower / "w").mkdir()
    os.chown(lower / "w", 1000, 1000)
    mnt = mounter(lower, uidmap=ROOT_KEPT)
    status = read_status(str(mnt))
    assert status is not None and status["server"] > 0, "no supervisor status"
    return mnt, status


def _kill_server(mnt, after: int = 0) -> int:
    """SIGKILL the mount's server; ``after``: the one killed before, whose
    successor is awaited first (on a loaded machine a restart can take
    longer than the test's spacing)."""
    deadline = time.monotonic() + 10
    while (pid := read_status(str(mnt))["server"]) in (after, 0):
        assert time.monotonic() < deadline, "no new server within 10 s"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return pid


def _check_after(lower, mnt, status, out, restarts):
    assert out["failed"] == 0, out
    assert out["done"] > 0
    now = read_status(str(mnt))
    assert now["supervisor"] == status["supervisor"] and now["restarts"] >= restarts, now
    assert os.listdir(mnt / "w")  # the mount is alive
    for name in os.listdir(lower / "w"):  # every file on the lower whole
        if name.startswith("f"):
            assert os.stat(lower / "w" / name).st_size in (0, KIB64), name


def test_a_killed_server_is_replaced_and_callers_see_nothing(lower, served):
    mnt, status = served
    t, out = _running_loop(mnt, 8)
    time.sleep(2)
    killed = _kill_server(mnt)
    t.join(90)
    _check_after(lower, mnt, status, out, 1)
    assert read_status(str(mnt))["server"] != killed


def test_a_listing_cut_by_a_kill_goes_on_whole(lower, served):
    """A directory read part of the way (the kernel asks for the rest
    without an open: no-opendir mode) when the server is killed: the new
    server, which has no stream parked for it, opens the directory again
    at the kernel's offset, and the listing ends with every name once."""
    mnt, _status = served
    big = lower / "big"
    big.mkdir()
    names = {f"entry-{i:05d}-{'y' * (i % 40)}" for i in range(4000)}
    for n in names:
        (big / n).write_text("")
    seen = []
    with os.scandir(mnt / "big") as it:
        for entry in it:
            seen.append(entry.name)
            if len(seen) == 300:
                killed = _kill_server(mnt)
    assert sorted(seen) == sorted(names)
    assert read_status(str(mnt))["server"] != killed


def test_twenty_kills_in_a_row(lower, served):
    mnt, status = served
    t, out = _running_loop(mnt, 8)
    time.sleep(0.5)
    killed = 0
    for _ in range(20):
        killed = _kill_server(mnt, after=killed)
        time.sleep(0.3)
    t.join(90)
    _check_after(lower, mnt, status, out, 20)


def test_upgrade_changes_the_server_and_nothing_else(lower, served):
    mnt, status = served
    t, out = _running_loop(mnt, 6)
    time.sleep(2)
    r = subprocess.run([sys.executable, "-m", "shiftfs", "upgrade", str(mnt)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    t.join(90)
    _check_after(lower, mnt, status, out, 1)
    now = read_status(str(mnt))
    assert now["server"] != status["server"]
    r = subprocess.run([sys.executable, "-m", "shiftfs", "status", str(mnt)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and f"supervisor {status['supervisor']}" in r.stdout, r


def _write_big(path: str, size: int) -> int:
    block = bytes(range(256)) * 4096  # 1 MiB, a pattern each offset can be checked against
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    return size


@pytest.mark.parametrize("passthrough", ["auto", "off"])
def test_a_kill_during_a_big_write_loses_and_doubles_nothing(lower, mounter, passthrough):
    (lower / "w").mkdir()
    os.chown(lower / "w", 1000, 1000)
    mnt = mounter(lower, uidmap=ROOT_KEPT, options=["-o", f"passthrough={passthrough}"])
    size = 256 << 20
    out = {}
    t = threading.Thread(target=lambda: out.update(n=call_as(
        _write_big, str(mnt / "w" / "big"), size, uid=USER, gid=USER, call_timeout=300)))
    t.start()
    time.sleep(1.0)
    _kill_server(mnt)
    t.join(300)
    assert out["n"] == size, out
    data = (lower / "w" / "big").read_bytes()
    assert len(data) == size
    assert data == bytes(range(256)) * 4096 * (size >> 20)


def _rename_storm(mnt: str, tag: str, seconds: float) -> dict:
    """Move this caller's files between two directories, back and forth;
    count the renames that succeeded (each either took effect or failed)."""
    done = failed = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        src, dst = ("a", "b") if i % 2 else ("b", "a")
        for k in range(5):
            try:
                os.rename(f"{mnt}/{src}/{tag}{k}", f"{mnt}/{dst}/{tag}{k}")
                done += 1
            except OSError as e:
                failed += 1
                if e.errno != errno.ENOENT:
                    raise
    return {"done": done, "failed": failed}


def test_a_kill_during_a_rename_storm_leaves_a_sequential_state(lower, mounter):
    """Two callers move their own files between two directories while the
    server is killed: every file exists exactly once, in one of the two
    (the state some sequential order of the renames gives), and no rename
    failed for a reason other than a name the caller itself moved away."""
    for d in ("a", "b"):
        (lower / d).mkdir()
        os.chown(lower / d, 1000, 1000)
    for tag in ("p", "q"):
        for k in range(5):
            (lower / "a" / f"{tag}{k}").write_text(tag)
            os.chown(lower / "a" / f"{tag}{k}", 1000, 1000)
    mnt = mounter(lower, uidmap=ROOT_KEPT)
    out = {}
    threads = [threading.Thread(target=lambda tag=tag: out.update({tag: call_as(
        _rename_storm, str(mnt), tag, 4.0, uid=USER, gid=USER, call_timeout=90)}))
        for tag in ("p", "q")]
    for t in threads:
        t.start()
    time.sleep(1.5)
    _kill_server(mnt)
    for t in threads:
        t.join(90)
    assert all(isinstance(v, dict) and v["done"] > 0 for v in out.values()), out
    for tag in ("p", "q"):
        for k in range(5):
            where = [d for d in ("a", "b") if (lower / d / f"{tag}{k}").exists()]
            assert len(where) == 1, (tag, k, where)
    assert sorted(os.listdir(mnt / "a") + os.listdir(mnt / "b")) == sorted(
        f"{t}{k}" for t in ("p", "q") for k in range(5))


def test_a_rootless_mount_survives_a_killed_server(lower, workdir):
    """The same where fusermount3 mounted (uid 1000, no privilege): the
    supervisor holds the fd fusermount3 passed, and a new server takes
    over; a file held open through the kill keeps working."""
    os.chown(lower, rootless.RUSER, rootless.RUSER)
    (lower / "kept").write_text("before")
    os.chown(lower / "kept", rootless.RUSER, rootless.RUSER)
    with rootless.mount_as_user(lower, workdir) as (supervisor, view, log):
        held = os.open(view / "kept", os.O_RDWR)
        try:
            servers = children(supervisor)
            assert len(servers) == 1, servers
            os.kill(servers[0], signal.SIGKILL)
            os.pwrite(held, b"after!", 0)  # served by the next server, on the kept fh
            assert os.pread(held, 6, 0) == b"after!"
            (lower / "new").write_text("n")  # a name the kernel never looked up: a LOOKUP
            assert sorted(os.listdir(view)) == ["kept", "new"] and os.path.exists(view / "new")
        finally:
            os.close(held)
        assert (lower / "kept").read_text() == "after!"
        assert "restart 1" in log.read_text()


def _copies(pid: int, directory) -> list[str]:
    """The files under ``directory`` that process ``pid`` holds fds of."""
    return [t for t in fd_targets(pid) if t.startswith(str(directory) + "/")]


def _create_and_close(mnt: str, count: int, unlink: bool) -> int:
    for i in range(count):
        path = os.path.join(mnt, "w", f"c{i}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        os.write(fd, b"#!/bin/sh\n")
        if unlink:
            os.unlink(path)
        os.close(fd)
    return count


def _held_by_supervisor_within(pid: int, directory, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (held := _copies(pid, directory)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def test_a_close_after_the_flush_an_upgrade_asks_for_goes_at_once():
    """An upgrade asks the server to flush (SIGUSR1: FdStore.flushed) and
    then kills it; the server serves requests until then. A CLOSE it
    queued after the flush (to ride on the next OPEN, or go within
    FLUSH_DELAY) died with it, and the supervisor kept a copy of a file the
    kernel had released (test_restart's upgrade test, 2 failures in 8 under
    load). After the flush every record goes at once, before the reply."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        store = FdStore(ours)
        store.flushed()
        assert MSG.unpack(theirs.recv(4096))[0] == FLUSHED
        store.released(7)  # a RELEASE served after the flush, before the kill
        theirs.settimeout(0.005)  # well inside FLUSH_DELAY: nothing waits for the flusher
        assert MSG.unpack(theirs.recv(4096))[:2] == (CLOSE, 7)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("unlink", [False, True], ids=["linked", "unlinked"])
def test_the_supervisor_lets_go_of_a_closed_file(lower, served, unlink):
    """Its copy of a caller's open goes soon after the close (a write-mode
    copy would deny an exec of the lower file, and keep a deleted file's
    space), though the CLOSE rides on the next OPEN's message when one
    comes: here none does."""
    mnt, status = served
    assert call_as(_create_and_close, str(mnt), 20, unlink, uid=USER, gid=USER) == 20
    assert _held_by_supervisor_within(status["supervisor"], lower / "w", 2.0) == []
    if not unlink:  # and the lower file runs: no writer holds it
        r = subprocess.run([str(lower / "w" / "c0")], capture_output=True, timeout=30)
        assert r.returncode == 0, r


def test_an_upgrade_leaves_no_copy_of_a_file_closed_before_it(lower, served):
    """Creates and closes go on while the server is replaced: the CLOSEs
    the old server had not sent yet are asked for (SIGUSR1) before it
    ends, so the supervisor keeps no copy of a released file."""
    mnt, status = served

    def churn():
        def loop(mnt):
            n = 0
            while not os.path.exists(os.path.join(mnt, "w", "stop")):
                n += _create_and_close(mnt, 10, False)
            return n
        out["n"] = call_as(loop, str(mnt), uid=USER, gid=USER, call_timeout=120)

    out = {}
    t = threading.Thread(target=churn)
    t.start()
    try:
        time.sleep(1)
        r = subprocess.run([sys.executable, "-m", "shiftfs", "upgrade", str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    finally:
        open(lower / "w" / "stop", "w").close()
        t.join(120)
    assert out.get("n", 0) > 0
    now = read_status(str(mnt))
    assert now["server"] != status["server"]
    assert _held_by_supervisor_within(now["supervisor"], lower / "w", 2.0) == []


def _journal_ids(supervisor: int) -> set[int]:
    """The node ids the mount's journal (the supervisor's memfd) records."""
    for fd in os.listdir(f"/proc/{supervisor}/fd"):
        try:
            if os.readlink(f"/proc/{supervisor}/fd/{fd}").startswith("/memfd:shiftfs-nodes"):
                own = os.open(f"/proc/{supervisor}/fd/{fd}", os.O_RDWR)
                break
        except OSError:
            continue
    else:
        raise AssertionError("no journal memfd")
    try:
        return {record[1] for record in NodeJournal(own).records()}
    finally:
        os.close(own)


def test_files_a_walk_named_need_no_record_to_serve_after_a_kill(ext4_lower, mounter):
    """A walk of 300 files on ext4 leaves the journal a record of each
    directory only: a file's node id spells its file handle. The server is
    killed; the files the kernel holds by those ids still stat, open and
    read through the names it cached, served by the new server."""
    many = ext4_lower / "many"
    many.mkdir()
    for i in range(300):
        (many / f"f{i}").write_text(f"file {i}\n")
    mnt = mounter(ext4_lower, uidmap=ROOT_KEPT)
    status = read_status(str(mnt))
    names = sorted(os.listdir(mnt / "many"))  # readdirplus: every file's id and attributes
    ids = {os.stat(mnt / "many" / n).st_ino for n in names}
    assert len(ids) == 300
    recorded = _journal_ids(status["supervisor"])
    assert len(recorded) <= 3, recorded  # the root and many/ (and the mount's own root)
    _kill_server(mnt)
    deadline = time.monotonic() + 10
    while read_status(str(mnt))["server"] in (status["server"], 0):
        assert time.monotonic() < deadline, "no new server within 10 s"
        time.sleep(0.01)
    for i in range(300):
        with open(mnt / "many" / f"f{i}") as f:
            assert f.read() == f"file {i}\n"
    assert read_status(str(mnt))["restarts"] >= 1

"""One caller holding files cannot take the mount away from the others
(issue 20, item 3).

Each file or directory the daemon serves for a caller holds a lower fd,
and the daemon's RLIMIT_NOFILE is shared by every caller. A user that
opens and holds as many files as its own limit allows used to exhaust it:
then every other caller's lookups and opens failed. Each caller uid now
gets a share of the fds the daemon holds for open files, so the hog gets
EMFILE first.
"""

from __future__ import annotations

import errno
import os
import resource  # here: a caller that drops to a user cannot load it later
import subprocess

import pytest

from tests.callers import Caller
from tests.daemon import foreground_daemon
from tests.tables import STD, args

pytestmark = pytest.mark.needs_root

HOG = 101000     # lower 1000
OTHER = 101001   # lower 1001
LIMIT = 2000     # the daemon's RLIMIT_NOFILE
COUNT = 1500     # more files (and directories) than the daemon has fds for, held at once


def _hold_until_refused(paths: list[str], directories: bool):
    """Open ``paths`` one by one and keep them open: how many opened, and
    the errno that stopped it (None: all opened). Its own limit first
    raised as far as it may go (the user's hard limit)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flags = os.O_RDONLY | (os.O_DIRECTORY if directories else 0)
    global _held
    _held = []
    for path in paths:
        try:
            _held.append(os.open(path, flags))
        except OSError as e:
            return len(_held), e.errno
    return len(_held), None


def _close_held(count: int) -> None:
    for _ in range(count):
        os.close(_held.pop())


def _as(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def tree(lower):
    for what in ("files", "dirs"):
        (lower / what).mkdir()
    for i in range(COUNT):
        (lower / "files" / f"f{i}").write_text("x")
        (lower / "dirs" / f"d{i}").mkdir()
    (lower / "other").mkdir()
    for i in range(20):
        (lower / "other" / f"o{i}").write_text(f"other's {i}\n")
    return lower


@pytest.mark.parametrize("what", ["files", "dirs"])
def test_one_user_holding_files_gets_emfile_and_the_others_keep_working(tree, workdir, what):
    """Under a daemon limited to 2,000 fds, a user opens and holds files
    until refused: it is refused with EMFILE, long before the daemon runs
    out, and another user's ls and cat still work; what the hog closes it
    may open again. Directories are opened by the kernel without the
    daemon (no-opendir mode): the hog holds all 1,500, which cost the
    daemon no fd, and the others still work."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    paths = [f"{mnt}/{what}/{'f' if what == 'files' else 'd'}{i}" for i in range(COUNT)]
    with foreground_daemon(tree, mnt, *args(STD), log=workdir / "log",
                           fd_limit=LIMIT), Caller(HOG, HOG) as hog:
        held, err = hog.call(_hold_until_refused, paths, what == "dirs")
        if what == "dirs":
            assert (held, err) == (COUNT, None)
        else:
            assert err == errno.EMFILE, (held, err)
            assert held < LIMIT // 4, f"the hog held {held} files before it was refused"
        ls = _as(OTHER, "ls", "-ln", f"{mnt}/other")
        assert ls.returncode == 0 and ls.stdout.count("\n") == 21, ls.stderr
        cat = _as(OTHER, "cat", f"{mnt}/other/o7", f"{mnt}/other/o19")
        assert (cat.returncode, cat.stdout) == (0, "other's 7\nother's 19\n"), cat.stderr
        assert hog.call(_close_held, held) is None
        assert hog.call(_hold_until_refused, paths, what == "dirs") == (held, err)


# ---- the table's accounting, without a mount ----

@pytest.fixture
def table(workdir):
    from shiftfs.inodes import ROOT_ID, InodeTable
    root = workdir / "root"
    root.mkdir()
    (root / "a").write_text("a")
    t = InodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    t.file_budget, t.file_share = 8, 2
    fd, st = t.open_at(t.root.fd, b"a")
    t.node_a = t.add(fd, st, ROOT_ID, b"a")
    t.request_done()
    try:
        yield t
    finally:
        t.close()


def _open_a(table, uid: int, flags: int = os.O_RDONLY, passthrough=None):
    table.admit(uid)
    fd = os.open(table.node_a.path, flags)
    return table.opened(table.node_a, fd, flags, uid, passthrough)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_each_uid_gets_its_share_and_all_together_the_budget(table):
    held = [_open_a(table, 1)[0] for _ in range(2)]
    with pytest.raises(OSError) as info:
        table.admit(1)
    assert info.value.errno == errno.EMFILE
    held += [_open_a(table, uid)[0] for uid in (2, 2, 3, 3)]
    for uid in (4, 5):
        table.dir_opened(os.open(table.root.path, os.O_RDONLY | os.O_DIRECTORY), uid,
                         table.root.node_id)
    with pytest.raises(OSError) as info:
        table.admit(6)  # a newcomer, but the budget (8) is held
    assert info.value.errno == errno.ENFILE
    before = _fds()
    table.closed(held[0])
    assert _fds() == before - 1
    table.admit(1)  # its share has room again
    table.admit(6)
    assert table.node_a.opens == 5 and table.file_fds == 7


def test_a_release_of_an_unknown_fh_closes_nothing(table):
    fd = os.open(table.root.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        table.closed(fd)
        assert os.fstat(fd)  # still open: the number was not the table's to close
    finally:
        os.close(fd)


def test_passed_through_opens_with_the_same_flags_share_one_fd(table):
    """The kernel holds a passed-through file's backing file, but FSYNC,
    LSEEK and the like still come with the fh: opens with the same flags
    share one real fd, counted once, against the uid whose open made it;
    the backing id goes back at the last close, and the fd with it."""
    backings = []
    before = _fds()
    fh1, b1 = _open_a(table, 1, os.O_RDWR, lambda: 7)
    fh2, b2 = _open_a(table, 2, os.O_RDWR | os.O_CREAT)  # flags only for opening don't count
    fh3, b3 = _open_a(table, 2, os.O_RDONLY)
    assert (b1, b2, b3) == (7, 7, 7)
    assert fh2 == fh1 and fh3 != fh1
    assert _fds() == before + 2
    assert table._uid_files == {1: 1, 2: 1} and table.node_a.opens == 3
    table.closed(fh1, backings.append)  # uid 1's open: uid 2's still uses the fd
    assert os.fstat(fh1) and table._uid_files == {1: 1, 2: 1}
    table.closed(fh2, backings.append)
    assert table._uid_files == {2: 1} and _fds() == before + 1
    assert backings == []
    table.closed(fh3, backings.append)
    assert backings == [7] and _fds() == before and table.node_a.opens == 0
    assert table.file_fds == 0 and table._uid_files == {}

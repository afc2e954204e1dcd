"""The Python API: ``from shiftfs import mount`` as a context manager."""

from __future__ import annotations

import os
import subprocess

import pytest

import shiftfs
from shiftfs import Extent, MountError, TableError, build_idmap, mount
from shiftfs.mount import is_mounted

pytestmark = pytest.mark.needs_root


@pytest.fixture
def tree(lower, workdir):
    (lower / "f").write_text("data")
    os.chown(lower / "f", 1000, 2000)
    mnt = workdir / "mnt"
    mnt.mkdir()
    return lower, mnt


def daemons_for(mountpoint) -> list[int]:
    """pids of shiftfs processes serving mountpoint."""
    out = subprocess.run(["pgrep", "-f", f"shiftfs -f -q .* {mountpoint}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_public_names():
    assert shiftfs.mount is mount
    assert {"mount", "MountError", "build_idmap", "Extent", "TableError"} <= set(shiftfs.__all__)
    assert "TableError" in (mount.__doc__ or "") and "MountError" in mount.__doc__


def test_live_inside_gone_after(tree):
    lower, mnt = tree
    with mount(lower, mnt, uidmap=[Extent(0, 100000, 65536)]) as mp:  # PathLike accepted
        assert mp == str(mnt)
        assert is_mounted(mp)
        st = os.stat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (101000, 102000)  # gid side copied the uid side
        assert (mnt / "f").read_text() == "data"
        assert daemons_for(mnt)
    assert not is_mounted(str(mnt), None)
    assert os.listdir(mnt) == []
    assert daemons_for(mnt) == []  # child reaped, nothing left serving


def test_table_given_as_strings_like_the_command_line(tree):
    # a str is one or more extents, never a sequence of one-character extents
    lower, mnt = tree
    os.chown(lower / "f", 1000, 3)
    with mount(lower, mnt, uidmap="0:100000:1000 1000:7000:1",
               gidmap="0:300000:65536") as mp:
        st = os.stat(os.path.join(mp, "f"))
        assert (st.st_uid, st.st_gid) == (7000, 300003)
    assert not is_mounted(str(mnt), None)


def test_count_missing_is_refused_before_anything_starts(tree):
    lower, mnt = tree
    with pytest.raises(TableError, match="COUNT missing"):
        with mount(lower, mnt, uidmap="0:100000"):
            pass
    assert not is_mounted(str(mnt), None)
    assert daemons_for(mnt) == []


def test_same_idmap_object_as_cli(tree):
    lower, mnt = tree
    idmap = build_idmap([Extent(0, 100000, 65536)], [Extent(0, 300000, 65536)])
    with mount(str(lower), str(mnt), idmap) as mp:
        st = os.stat(os.path.join(mp, "f"))
        assert (st.st_uid, st.st_gid) == (101000, 302000)


def test_string_extents_and_options(tree):
    lower, mnt = tree
    with mount(lower, mnt, uidmap=["0:100000:65536"], gidmap=["0:100000:65536"],
               options=["-o", "ro"]) as mp:
        assert os.stat(mnt / "f").st_uid == 101000
        with pytest.raises(OSError) as info:
            open(os.path.join(mp, "new"), "w")
        assert info.value.errno == 30  # EROFS
    assert not is_mounted(str(mnt), None)


def test_unmounted_when_body_raises(tree):
    lower, mnt = tree

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with mount(lower, mnt, uidmap=["0:100000:65536"]):
            assert is_mounted(str(mnt))
            raise Boom()
    assert not is_mounted(str(mnt), None)
    assert daemons_for(mnt) == []


def test_unmounted_when_busy(tree):
    """An open file inside keeps the mount busy: still detached on exit."""
    lower, mnt = tree
    with mount(lower, mnt, uidmap=["0:100000:65536"]):
        f = open(mnt / "f")
        os.chdir("/")
    try:
        assert not is_mounted(str(mnt), None)
    finally:
        f.close()


def test_bad_table_raises_before_mounting(tree):
    lower, mnt = tree
    with pytest.raises(TableError, match=r"'0:100000:10' and '5:200000:10' overlap on the lower side"):
        with mount(lower, mnt, uidmap=["0:100000:10", "5:200000:10"]):
            pytest.fail("body must not run")
    with pytest.raises(TableError, match="overlap on the upper side"):
        with mount(lower, mnt, uidmap=[Extent(0, 100, 10), Extent(20, 105, 10)]):
            pytest.fail("body must not run")
    with pytest.raises(TableError, match="expected LOWER:UPPER:COUNT"):
        with mount(lower, mnt, uidmap=["0-100000-10"]):
            pytest.fail("body must not run")
    assert isinstance(TableError("x"), ValueError)
    assert not is_mounted(str(mnt), None)


def test_child_failure_is_a_clear_error(tree, workdir):
    lower, _mnt = tree
    with pytest.raises(MountError, match="does not exist"):
        with mount(lower, workdir / "missing", uidmap=["0:100000:65536"]):
            pytest.fail("body must not run")
    with pytest.raises(MountError, match="unknown mount option 'bogus'"):
        with mount(lower, _mnt, uidmap=["0:100000:65536"], options=["-o", "bogus"]):
            pytest.fail("body must not run")
    assert isinstance(MountError("x"), OSError)


def test_refuses_existing_mount_point(tree):
    lower, mnt = tree
    with mount(lower, mnt, uidmap=["0:100000:65536"]):
        with pytest.raises(MountError, match="already a mount point"):
            with mount(lower, mnt, uidmap=["0:200000:65536"]):
                pytest.fail("body must not run")
        assert is_mounted(str(mnt))  # the outer mount is left alone
        assert os.stat(mnt / "f").st_uid == 101000
    assert not is_mounted(str(mnt), None)


def test_chatty_child_does_not_block(tree):
    """-d writes a line per request; with stderr on a pipe nobody reads, the
    daemon would stall once the pipe is full."""
    lower, mnt = tree
    for i in range(300):
        (lower / f"file{i:03d}").write_text("")
    with mount(lower, mnt, uidmap=["0:100000:65536"], options=["-d"]):
        for _ in range(5):
            names = os.listdir(mnt)
            for name in names:
                os.lstat(mnt / name)
        assert len(names) == 301

"""The mount root (a root daemon): the mount shows the FUSE root's one
directory, the lower's root, looked up after INIT, so its POSIX ACL is
cached like any other inode's and a path walk through the mount root sends
no GETXATTR (issue 13 item 7). Counted with the fuse:fuse_request_send
tracepoint (fuse_requests.py)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.callers import call_as, errno_of
from tests.tables import STD

pytestmark = pytest.mark.needs_root

USER = 101000  # upper id of lower 1000 under the standard table


def _tree(lower):
    for d in ("a", "a/b", "c"):
        (lower / d).mkdir()
    paths = []
    for d in ("a", "a/b", "c"):
        for i in range(10):
            p = lower / d / f"f{i}"
            p.write_text("x")
            paths.append(f"{d}/f{i}")
    os.chmod(lower, 0o755)  # group bits: a non-owner's walk consults the ACL
    return paths


def _mountinfo(mnt):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return fields[3], fields[fields.index("-") + 1]
    return None


def _stat_all(mnt, paths, rounds):
    for _ in range(rounds):
        for p in paths:
            os.stat(f"{mnt}/{p}")  # an absolute walk: it enters through the mount root


def test_warm_absolute_walks_send_no_root_acl_request(lower, mounter, counter):
    paths = _tree(lower)
    mnt = mounter(lower)
    _stat_all(mnt, paths, 1)  # cold: looks up, fetches each ACL once
    counter.start(os.stat(mnt).st_dev)
    _stat_all(mnt, paths, 10)
    counts = counter.stop()
    assert counts["xattr:system.posix_acl_access"] == 0, counts
    assert sum(v for k, v in counts.items() if k.startswith("FUSE_")) == 0, counts


def _stat_paths(mnt, paths):
    for p in paths:
        os.stat(f"{mnt}/{p}")
    return True


def _listdir(path):
    return sorted(os.listdir(path))


def test_warm_walks_of_a_user_send_nothing_either(lower, mounter, counter):
    paths = _tree(lower)
    mnt = mounter(lower)
    assert call_as(_stat_paths, str(mnt), paths, uid=USER, gid=USER) is True
    counter.start(os.stat(mnt).st_dev)
    for _ in range(3):
        assert call_as(_stat_paths, str(mnt), paths, uid=USER, gid=USER) is True
    counts = counter.stop()
    assert counts["FUSE_GETXATTR"] == 0, counts


def test_an_acl_on_the_lower_root_is_shown_and_enforced(lower, mounter):
    _tree(lower)
    os.chmod(lower, 0o750)
    subprocess.run(["setfacl", "-m", "u:2000:rx", str(lower)], check=True)
    mnt = mounter(lower)
    acl = subprocess.run(["getfacl", "-n", "-p", str(mnt)], capture_output=True, text=True).stdout
    assert "user:102000:r-x" in acl, acl
    assert call_as(_listdir, str(mnt), uid=102000, gid=102000) == ["a", "c"]
    assert errno_of(call_as(_listdir, str(mnt), uid=103000, gid=103000)) == errno.EACCES
    # changed through the mount: the root's cached ACL goes with it
    subprocess.run(["setfacl", "-x", "u:102000", str(mnt)], check=True)
    assert errno_of(call_as(_listdir, str(mnt), uid=102000, gid=102000)) == errno.EACCES
    assert "user:2000:" not in subprocess.run(["getfacl", "-n", "-p", str(lower)],
                                              capture_output=True, text=True).stdout


def test_the_mount_is_the_lower_root_and_nothing_above_it(lower, mounter, workdir):
    _tree(lower)
    mnt = mounter(lower)
    root, fstype = _mountinfo(mnt)
    assert (root, fstype) == ("/root", "fuse.shiftfs")
    assert sorted(os.listdir(mnt)) == ["a", "c"]  # the lower's entries, no FUSE root above
    up = os.stat(f"{mnt}/..")
    assert (up.st_dev, up.st_ino) == (os.stat(workdir).st_dev, os.stat(workdir).st_ino)
    st = os.stat(mnt)
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    assert st.st_ino == os.stat(lower).st_ino


def test_unmount_leaves_no_fuse_mount_behind(lower, workdir):
    from shiftfs import mount
    _tree(lower)
    mnt = workdir / "m"
    mnt.mkdir()
    with mount(lower, mnt, uidmap=STD):
        assert _mountinfo(mnt) is not None
    with open("/proc/self/mountinfo") as f:
        left = [line for line in f if f" {lower} " in line or str(mnt) in line]
    assert left == []

"""Red-team findings on the root daemon's own mount and unmount: the mount
point is a path an unprivileged user may be able to change (a directory of
theirs on the way to it). The daemon runs as root, so a path it resolves
again later can send its mount or its unmount somewhere else (a symlink
swapped in for a parent directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.callers import call_as
from tests.daemon import shiftfs_command, wait_for_mount
from tests.tables import STD, args
from shiftfs.mount import is_mounted, mountinfo, unmount

pytestmark = pytest.mark.needs_root

USER = 1000
MAP = args(STD)


def _swap_parent(home):
    """The user's attack: their directory a (holding the mount point) is
    renamed away and a new a put in its place, whose mnt is a symlink to
    the victim mount."""
    os.rename(f"{home}/a", f"{home}/a2")
    os.mkdir(f"{home}/a")
    os.symlink(f"{home}/../victim", f"{home}/a/mnt")


def _ours(workdir):
    return [mp for _dev, _src, mp, fstype in mountinfo()
            if fstype == "fuse.shiftfs" and mp.startswith(str(workdir) + "/")]


@pytest.fixture
def setting(workdir):
    """workdir/home (the user's, holding a/mnt) and workdir/victim, a tmpfs
    mount point standing for /proc, /sys or another container's mount,
    with a directory mnt in it. Everything unmounted at teardown."""
    home, victim = workdir / "home", workdir / "victim"
    (home / "a" / "mnt").mkdir(parents=True)
    (workdir / "lower").mkdir()
    os.chown(home, USER, USER)
    os.chown(home / "a", USER, USER)
    victim.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "redteam-victim", str(victim)], check=True)
    (victim / "mnt").mkdir()
    procs = []
    try:
        yield home, victim, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for mp in _ours(workdir):  # the paths as the kernel has them now
            unmount(mp, lazy=True)
        if is_mounted(str(victim), None):
            unmount(str(victim), lazy=True)


def test_sigterm_unmount_does_not_follow_a_swapped_parent(workdir, setting):
    """SIGTERM unmounted the mount point by path (umount2 follows symlinks):
    with the parent swapped for a symlink, the root daemon detached the
    victim mount instead, and left its own mount (and itself) behind."""
    home, victim, procs = setting
    log = workdir / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(shiftfs_command(workdir / "lower", home / "a" / "mnt", *MAP),
                                stdout=subprocess.DEVNULL, stderr=err)
    procs.append(proc)
    wait_for_mount(proc, home / "a" / "mnt", mounted=lambda _proc: bool(_ours(workdir)), log=log,
                   what="shiftfs")
    call_as(_swap_parent, str(home), uid=USER, gid=USER)
    assert os.path.realpath(home / "a" / "mnt") == str(victim)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    assert is_mounted(str(victim), None), "the daemon detached the victim mount"
    assert _ours(workdir) == [], "the daemon left its own (moved) mount behind"


HARNESS = textwrap.dedent("""
    import os, sys
    import importlib
    m = importlib.import_module("shiftfs.daemon")
    from shiftfs.command import main
    home = sys.argv[1]
    orig = m._open_device
    def won_the_race(*args):  # the user's swap lands while the daemon sets up
        if not os.path.islink(home + "/a"):
            pid = os.fork()
            if pid == 0:
                os.setgid(%d); os.setuid(%d)
                os.rename(home + "/a", home + "/a2")
                os.symlink(home + "/../victim", home + "/a")
                os._exit(0)
            os.waitpid(pid, 0)
        return orig(*args)
    m._open_device = won_the_race
    sys.exit(main(sys.argv[2:]))
""" % (USER, USER))


def test_mount_lands_on_the_checked_directory(workdir, setting):
    """The mount point was checked, then mounted on by path seconds later
    (move_mount follows symlinks in its parents): a parent swapped in
    between sent a root mount of the user's lower onto the victim."""
    home, victim, procs = setting
    log = workdir / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(home), "-f", "-q", *MAP,
                                 str(workdir / "lower"), str(home / "a" / "mnt")],
                                stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    procs.append(proc)
    deadline = time.monotonic() + 20
    while not _ours(workdir) and proc.poll() is None:
        assert time.monotonic() < deadline, "shiftfs neither mounted nor failed within 20 s"
        time.sleep(0.02)
    assert os.path.islink(home / "a"), log.read_text()
    assert _ours(workdir) == [str(home / "a2" / "mnt")], log.read_text()

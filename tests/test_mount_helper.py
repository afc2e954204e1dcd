"""shiftfs as a mount helper: ``mount -t fuse.shiftfs`` and /etc/fstab lines,
through libfuse's mount.fuse3, with real mount(8) calls.

mount(8) runs helpers without PATH, so mount.fuse3's ``/bin/sh -c 'shiftfs
...'`` finds ``shiftfs`` only in the shell's default path (/usr/local/sbin,
/usr/local/bin, /usr/sbin, /usr/bin, /sbin, /bin). An installed package puts
its console script there; when this Python's scripts directory is elsewhere
(pyenv, a venv), the ``helper_on_path`` fixture links the console script into
/usr/local/sbin for the module and removes the link afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from shiftfs.mount import is_mounted, mounts, unmount

from tests import tables

pytestmark = pytest.mark.needs_root

DEFAULT_SHELL_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
STD = tables.option(tables.STD)  # uidmap=0:100000:65536,gidmap=0:100000:65536


@pytest.fixture(scope="module")
def helper_on_path():
    found = shutil.which("shiftfs", path=os.pathsep.join(DEFAULT_SHELL_PATH))
    if found:
        yield found
        return
    script = os.path.join(sysconfig.get_path("scripts"), "shiftfs")
    link = "/usr/local/sbin/shiftfs"
    os.makedirs("/usr/local/sbin", exist_ok=True)
    if os.path.exists(script):
        os.symlink(script, link)  # the package's own console script
    else:  # not installed: the same entry point through this interpreter
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(link, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m shiftfs \"$@\"\n")
        os.chmod(link, 0o755)
    try:
        yield link
    finally:
        os.unlink(link)


def mount_options(mountpoint) -> tuple[str, str]:
    """(fstype, per-mount options) of mountpoint from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                return fields[sep + 1], fields[5]
    raise AssertionError(f"{mountpoint} is not mounted")


@contextlib.contextmanager
def unmounted_after(mountpoint):
    try:
        yield
    finally:
        if is_mounted(str(mountpoint), None):
            try:
                unmount(str(mountpoint))
            except OSError:
                unmount(str(mountpoint), lazy=True)


def run_mount(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def tree(lower, tmp_path):
    (lower / "root-file").write_text("x")
    (lower / "user-file").write_text("y")
    os.chown(lower / "user-file", 1000, 1001)
    (lower / "stray").write_text("z")
    os.chown(lower / "stray", 70000, 70000)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return lower, mnt


def test_mount_t_fuse_shiftfs(helper_on_path, tree):
    lower, mnt = tree
    with unmounted_after(mnt):
        r = run_mount("-t", "fuse.shiftfs", lower, mnt, "-o", STD)
        assert r.returncode == 0, r.stderr
        assert is_mounted(str(mnt))
        assert "u:0:100000:65536" in r.stdout  # the effective table, printed at mount time
        st = os.stat(mnt / "user-file")
        assert (st.st_uid, st.st_gid) == (101000, 101001)
        st = os.stat(mnt / "stray")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert (mnt / "root-file").read_text() == "x"
        assert os.stat(mnt).st_uid == 100000
        fstype, opts = mount_options(mnt)
        assert fstype == "fuse.shiftfs"
        # mount.fuse3 passes "dev,suid" unless told otherwise: still nosuid,nodev
        assert {"nosuid", "nodev"} <= set(opts.split(","))
        assert any(src == str(lower) and mp == str(mnt) for src, mp, _t in mounts())
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(str(mnt), None)
    assert os.stat(lower / "user-file").st_uid == 1000  # lower untouched


def test_plus_separated_extents_and_foreign_options(helper_on_path, tree):
    lower, mnt = tree
    opts = ("rw,defaults,nofail,_netdev,noatime,"
            "uidmap=0:100000:1000+1000:5000:10+70000:70000:1,gidmap=0:200000:65536")
    with unmounted_after(mnt):
        r = run_mount("-t", "fuse.shiftfs", lower, mnt, "-o", opts)
        assert r.returncode == 0, r.stderr
        st = os.stat(mnt / "user-file")
        assert (st.st_uid, st.st_gid) == (5000, 201001)
        st = os.stat(mnt / "stray")
        assert (st.st_uid, st.st_gid) == (70000, 65534)
        assert os.stat(mnt / "root-file").st_uid == 100000
        _fstype, mopts = mount_options(mnt)
        assert "noatime" in mopts.split(",")


def write_fstab(path, lower, mnt, options):
    def esc(p):
        return str(p).replace("\\", "\\134").replace(" ", "\\040")
    path.write_text("# temporary fstab for the shiftfs tests\n"
                    f"{esc(lower)} {esc(mnt)} fuse.shiftfs {options} 0 0\n")


def test_fstab_line(helper_on_path, tree, tmp_path):
    lower, mnt = tree
    fstab = tmp_path / "fstab"
    write_fstab(fstab, lower, mnt, STD + ",nofail,_netdev,defaults")
    with unmounted_after(mnt):
        r = run_mount("-T", fstab, mnt)  # by mount point alone: the line gives the rest
        assert r.returncode == 0, r.stderr
        st = os.stat(mnt / "user-file")
        assert (st.st_uid, st.st_gid) == (101000, 101001)
        fstype, opts = mount_options(mnt)
        assert fstype == "fuse.shiftfs"
        assert {"nosuid", "nodev"} <= set(opts.split(","))
        # the whole file, as at boot
        subprocess.run(["umount", str(mnt)], check=True)
        r = run_mount("--fstab", fstab, "-a", "-t", "fuse.shiftfs")
        assert r.returncode == 0, r.stderr
        assert os.stat(mnt / "stray").st_uid == 65534


def test_fstab_paths_with_spaces(helper_on_path, lower, tmp_path):
    (lower / "f").write_text("")
    os.chown(lower / "f", 7, 7)
    spaced_lower = tmp_path / "lower dir"
    os.rename(lower, spaced_lower)
    mnt = tmp_path / "mount point"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    write_fstab(fstab, spaced_lower, mnt, STD)
    with unmounted_after(mnt):
        r = run_mount("-T", fstab, mnt)
        assert r.returncode == 0, r.stderr
        assert os.stat(mnt / "f").st_uid == 100007


def test_fstab_explicit_suid_dev(helper_on_path, tree, tmp_path):
    """suid/dev in fstab are consumed by mount(8), and mount.fuse3 adds
    dev,suid to every line: only allow_suid/allow_dev lift nosuid,nodev."""
    lower, mnt = tree
    fstab = tmp_path / "fstab"
    write_fstab(fstab, lower, mnt, STD + ",suid,dev")
    with unmounted_after(mnt):
        assert run_mount("-T", fstab, mnt).returncode == 0
        assert {"nosuid", "nodev"} <= set(mount_options(mnt)[1].split(","))
        subprocess.run(["umount", str(mnt)], check=True)
        # lower 0 shown as upper 0: a set-uid-root file stays one on this host
        write_fstab(fstab, lower, mnt, "uidmap=0:0:65536,allow_suid,allow_dev")
        r = run_mount("-T", fstab, mnt)
        assert r.returncode == 0, r.stderr
        opts = set(mount_options(mnt)[1].split(","))
        assert not {"nosuid", "nodev"} & opts
        assert "runs as root on this host" in r.stderr  # said loudly
        assert "device nodes" in r.stderr


def test_mount_helper_bad_table_fails_cleanly(helper_on_path, tree):
    lower, mnt = tree
    with unmounted_after(mnt):
        r = run_mount("-t", "fuse.shiftfs", lower, mnt,
                      "-o", "uidmap=0:100000:10+5:200000:10")
        assert r.returncode != 0
        assert "overlap" in r.stderr and "0:100000:10" in r.stderr
        assert not is_mounted(str(mnt), None)


def test_mount_helper_unknown_option_fails(helper_on_path, tree):
    lower, mnt = tree
    with unmounted_after(mnt):
        r = run_mount("-t", "fuse.shiftfs", lower, mnt, "-o", STD + ",frobnicate")
        assert r.returncode != 0
        assert "unknown mount option 'frobnicate'" in r.stderr
        assert not is_mounted(str(mnt), None)

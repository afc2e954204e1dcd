"""Bad input on the command line: every case must give ONE line on stderr
naming the problem, a non-zero exit (2 for usage), leave no mount behind and
leave the lower tree exactly as it was (full metadata listing compared).

Each case runs the real command without -n/-f: if a case were wrongly
accepted, shiftfs would mount (and daemonize); the test then unmounts and
fails.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shiftfs.mount import mounts

from tests import tables

pytestmark = pytest.mark.needs_root

REPO = Path(__file__).resolve().parent.parent
STD = tables.args(tables.STD)  # --uidmap 0:100000:65536 --gidmap 0:100000:65536


# ---- the lower tree and its full metadata listing ------------------------------

def build_tree(lower: Path) -> None:
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "file").write_bytes(b"content\n")
    os.chown(lower / "file", 1000, 1000)
    (lower / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(lower / "suid", 0o4755)
    (lower / "unmapped").write_bytes(b"x")
    os.chown(lower / "unmapped", 70000, 70000)
    os.chmod(lower / "dir", 0o2775)
    os.chown(lower / "dir", 0, 1000)
    os.symlink("/etc/passwd", lower / "abs-link")
    os.symlink("../../outside", lower / "dir" / "rel-link")
    os.mkfifo(lower / "fifo")
    os.link(lower / "file", lower / "dir" / "hardlink")
    os.setxattr(lower / "file", "user.note", b"kept")
    os.setxattr(lower / "file", "trusted.secret", b"t")
    subprocess.run(["setfacl", "-m", "u:1001:rwx,d:g:1002:rx", str(lower / "dir")], check=True)


def listing(root: Path) -> list[tuple]:
    """Everything about every entry except atime (reading may update it)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted([""] if dirpath == str(root) else []) + sorted(dirnames + filenames):
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            entry = [os.path.relpath(path, root), st.st_mode, st.st_uid, st.st_gid, st.st_size,
                     st.st_nlink, st.st_ino, st.st_rdev, st.st_mtime_ns, st.st_ctime_ns]
            if stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            else:
                entry.append(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                    for n in os.listxattr(path, follow_symlinks=False)))
            if stat.S_ISREG(st.st_mode):
                entry.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            out.append(tuple(entry))
    return out


def fuse_mounts_of(lower: Path, mnt: Path) -> list:
    return [m for m in mounts()
            if m[2].startswith("fuse") and (m[1] == str(mnt) or m[0] == str(lower))]


@pytest.fixture
def scene(workdir):
    lower = workdir / "lower"
    lower.mkdir()
    build_tree(lower)
    mnt = workdir / "mnt"
    mnt.mkdir()
    (workdir / "plainfile").write_text("not a dir\n")
    os.symlink(lower, workdir / "lower-link")
    before = listing(lower)
    yield workdir, lower, mnt
    # teardown: never leave a mount behind, whatever happened
    for m in fuse_mounts_of(lower, mnt):
        subprocess.run(["fusermount3", "-u", "-z", m[1]], capture_output=True)
    assert listing(lower) == before, "the lower tree changed"


def run_shiftfs(args, prefix=(), env=None, timeout=30):
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.update(env or {})
    return subprocess.run(list(prefix) + [sys.executable, "-m", "shiftfs"] + list(args),
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd="/")


def check_refused(r, lower, mnt, expect, rc=2):
    leftover = fuse_mounts_of(lower, mnt)
    for m in leftover:  # a wrongly accepted case mounted: clean up, then fail
        subprocess.run(["fusermount3", "-u", "-z", m[1]], capture_output=True)
    assert not leftover, f"a mount was left behind: {leftover}\nstderr: {r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {r.stderr!r}"
    assert lines[0].startswith("shiftfs: "), lines[0]
    for word in ([expect] if isinstance(expect, str) else expect):
        assert word.lower() in lines[0].lower(), f"{word!r} not named in {lines[0]!r}"
    assert r.returncode == rc, f"exit {r.returncode}, wanted {rc}: {lines[0]}"


# ---- the cases ---------------------------------------------------------------
# (id, argument list with {L} lower, {M} mount point, {W} workdir, words the
#  one line must contain)

CASES = [
    # malformed tables
    ("overlap-lower", ["{L}", "{M}", "-u", "0:100000:10", "-u", "5:200000:10"],
     ["overlap", "lower", "0:100000:10", "5:200000:10"]),
    ("overlap-upper", ["{L}", "{M}", "-u", "0:100000:10", "-u", "100:100005:10"],
     ["overlap", "upper", "0:100000:10", "100:100005:10"]),
    ("overlap-gid", ["{L}", "{M}", "-u", "0:100000:10", "-g", "0:1:5", "-g", "3:50:5"],
     ["gid table", "overlap"]),
    ("overlap-in-one-value", ["{L}", "{M}", "-o", "uidmap=0:100000:10+9:300000:1"],
     ["overlap", "9:300000:1"]),
    ("zero-count", ["{L}", "{M}", "-u", "0:100000:0"], ["0:100000:0", "count"]),
    ("overflow-upper", ["{L}", "{M}", "-u", "0:4294967000:1000"], ["4294967000", "past"]),
    ("overflow-lower", ["{L}", "{M}", "-u", "4294967290:0:10"], ["4294967290", "past"]),
    ("id-4294967295-upper", ["{L}", "{M}", "-u", "0:4294967295:1"], ["4294967295"]),
    ("id-4294967295-lower", ["{L}", "{M}", "-u", "4294967295:0:1"], ["4294967295"]),
    ("huge-number", ["{L}", "{M}", "-u", "0:0:99999999999999999999"], ["99999999999999999999"]),
    ("negative", ["{L}", "{M}", "--uidmap", "-1:100000:1"], ["-1", "not a non-negative number"]),
    ("negative-short", ["{L}", "{M}", "-u", "0:-5:1"], ["-5"]),
    ("non-numeric", ["{L}", "{M}", "-u", "root:100000:1"], ["root", "not a non-negative number"]),
    ("hex", ["{L}", "{M}", "-u", "0x10:100000:1"], ["0x10"]),
    ("unicode-digit", ["{L}", "{M}", "-u", "\uff10:100000:1"], ["\uff10"]),
    ("empty-uidmap", ["{L}", "{M}", "-u", "0:100000:1", "-g", ""], ["--gidmap", "empty"]),
    ("empty-o-uidmap", ["{L}", "{M}", "-g", "0:100000:1", "-o", "uidmap="], ["uidmap", "empty"]),
    ("no-table", ["{L}", "{M}"], ["no mapping"]),
    ("trailing-colon", ["{L}", "{M}", "-u", "0:100000:65536:"], ["0:100000:65536:", "LOWER:UPPER:COUNT"]),
    ("trailing-comma", ["{L}", "{M}", "-u", "0:100000:65536,"], ["0:100000:65536,"]),
    ("too-few-fields", ["{L}", "{M}", "-u", "5"], ["'5'", "LOWER:UPPER:COUNT"]),
    # LOWER:UPPER most likely meant a shift of the whole range, not one id
    ("count-missing", ["{L}", "{M}", "--uidmap", "0:100000"],
     ["'0:100000'", "COUNT missing", "0:100000:65536", "0:100000:1", "--map 0/100000"]),
    ("count-missing-o", ["{L}", "{M}", "-o", "uidmap=0:100000:65536,gidmap=0:100000"],
     ["'0:100000'", "COUNT missing"]),
    ("count-missing-map", ["{L}", "{M}", "--map", "b:0:100000"], ["'0:100000'", "COUNT missing"]),
    ("map-stray-separator", ["{L}", "{M}", "--map", "b:0:100000:10,"], ["stray separator"]),
    ("unknown-prefix", ["{L}", "{M}", "--map", "x:0:100000:10"], ["x:0:100000:10", "prefix"]),
    ("unknown-user", ["{L}", "{M}", "--map", "no-such-user-zz/0"], ["unknown user", "no-such-user-zz"]),
    ("unknown-group", ["{L}", "{M}", "--map", "@no-such-group-zz/@0"], ["unknown group", "no-such-group-zz"]),
    ("pair-user-vs-group", ["{L}", "{M}", "--map", "0/@0"], ["both sides"]),
    ("unknown-subuid-user", ["{L}", "{M}", "--subuid", "no-such-user-zz"], ["no-such-user-zz"]),
    ("userns-not-a-pid", ["{L}", "{M}", "--userns", "self"], ["self", "not a process id"]),
    ("userns-no-such-pid", ["{L}", "{M}", "--userns", "999999999"], ["999999999"]),
    # paths
    ("lower-missing", ["{W}/nope", "{M}", *STD], ["lower directory", "does not exist"]),
    ("lower-not-dir", ["{W}/plainfile", "{M}", *STD], ["lower directory", "not a directory"]),
    ("mnt-missing", ["{L}", "{W}/nope", *STD], ["mount point", "does not exist"]),
    ("mnt-not-dir", ["{L}", "{W}/plainfile", *STD], ["mount point", "not a directory"]),
    ("mnt-is-lower", ["{L}", "{L}", *STD], ["inside the lower"]),
    ("mnt-inside-lower", ["{L}", "{L}/dir/sub", *STD], ["inside the lower"]),
    ("mnt-via-symlink-to-lower", ["{W}/lower-link", "{L}/dir", *STD], ["inside the lower"]),
    ("mnt-is-symlink-to-lower", ["{L}", "{W}/lower-link", *STD], ["inside the lower"]),
    # options
    ("unknown-o", ["{L}", "{M}", *STD, "-o", "frobnicate"], ["unknown mount option", "frobnicate"]),
    ("unknown-o-with-value", ["{L}", "{M}", *STD, "-o", "ro,colour=blue"], ["colour=blue"]),
    ("flag-with-value", ["{L}", "{M}", *STD, "-o", "suid=1"], ["suid=1"]),
    ("unknown-flag", ["{L}", "{M}", *STD, "--frobnicate"], ["--frobnicate"]),
    ("extra-positional", ["{L}", "{M}", "{W}", *STD], ["unrecognized"]),
    ("missing-positional", [*STD], ["required"]),
    ("conflict-ro-rw", ["{L}", "{M}", *STD, "-o", "ro,rw"], ["conflicting", "ro", "rw"]),
    ("conflict-suid", ["{L}", "{M}", *STD, "-o", "suid", "-o", "nosuid"], ["conflicting", "nosuid"]),
    ("conflict-dev", ["{L}", "{M}", *STD, "-o", "nodev,allow_dev"], ["conflicting", "nodev"]),
    ("conflict-exec", ["{L}", "{M}", *STD, "-o", "noexec,exec"], ["conflicting", "noexec"]),
    ("timeout-negative", ["{L}", "{M}", *STD, "-o", "attr_timeout=-1"], ["attr_timeout=-1", "negative"]),
    ("timeout-not-number", ["{L}", "{M}", *STD, "-o", "entry_timeout=soon"], ["entry_timeout=soon"]),
    ("timeout-nan", ["{L}", "{M}", *STD, "-o", "timeout=nan"], ["timeout=nan", "finite"]),
    ("cache-unknown", ["{L}", "{M}", *STD, "-o", "cache=sometimes"], ["cache=sometimes", "auto, watch, timeout or forever"]),
    ("timeout-inf", ["{L}", "{M}", *STD, "-o", "negative_timeout=inf"], ["negative_timeout=inf"]),
]


@pytest.mark.parametrize("args,expect", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input(scene, args, expect):
    workdir, lower, mnt = scene
    args = [a.format(L=lower, M=mnt, W=workdir) for a in args]
    r = run_shiftfs(args)
    check_refused(r, lower, mnt, expect)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_mount_point_already_mounted(scene):
    workdir, lower, mnt = scene
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "shiftfs-test-busy", str(mnt)],
                   check=True)
    try:
        r = run_shiftfs([str(lower), str(mnt), *STD])
        check_refused(r, lower, mnt, ["already a mount point", str(mnt)])
        assert [m for m in mounts() if m[1] == str(mnt)] == \
            [("shiftfs-test-busy", str(mnt), "tmpfs")], "the existing mount was disturbed"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_mount_point_already_a_shiftfs_mount(scene, mounter):
    workdir, lower, _mnt = scene
    mp = mounter(lower)
    r = run_shiftfs([str(lower), str(mp), *STD])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "already a mount point" in lines[0], r.stderr
    assert sum(1 for m in mounts() if m[1] == str(mp)) == 1


def test_no_dev_fuse(scene):
    """/dev/fuse absent (a private mount namespace with an empty /dev)."""
    workdir, lower, mnt = scene
    r = run_shiftfs([str(lower), str(mnt), *STD],
                    prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs none /dev && exec "$@"', "sh"])
    check_refused(r, lower, mnt, ["/dev/fuse", "does not exist"])


@pytest.mark.parametrize("fake", ["regular-file", "dev-null"])
def test_dev_fuse_not_the_fuse_device(scene, fake):
    """/dev/fuse replaced (bind mount in a private namespace) by a file or another device."""
    workdir, lower, mnt = scene
    source = "/dev/null"
    if fake == "regular-file":
        source = str(workdir / "fake-fuse")
        Path(source).write_bytes(b"")
        os.chmod(source, 0o666)
    r = run_shiftfs([str(lower), str(mnt), *STD],
                    prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f'mount --bind {source} /dev/fuse && exec "$@"', "sh"])
    check_refused(r, lower, mnt, ["/dev/fuse", "not the FUSE device"])


# libfuse is loaded only where fusermount3 mounts, for a daemon that cannot
# mount itself: root of a user namespace without a mount namespace of its own
AS_USER = ("unshare", "--user", "--map-root-user")


def test_libfuse3_missing(scene):
    workdir, lower, mnt = scene
    r = run_shiftfs([str(lower), str(mnt), *STD], prefix=AS_USER,
                    env={"FUSE_LIBRARY_PATH": str(workdir / "no" / "libfuse3.so.3")})
    check_refused(r, lower, mnt, ["libfuse3 not found", "fuse3 package"])


def test_libfuse2_instead_of_3(scene):
    lib2 = next((p for p in ("/lib/x86_64-linux-gnu/libfuse.so.2", "/usr/lib/x86_64-linux-gnu/libfuse.so.2",
                             "/lib/aarch64-linux-gnu/libfuse.so.2") if os.path.exists(p)), None)
    if lib2 is None:
        pytest.skip("libfuse2 is not installed (bindfs pulls it in)")
    workdir, lower, mnt = scene
    r = run_shiftfs([str(lower), str(mnt), *STD], prefix=AS_USER, env={"FUSE_LIBRARY_PATH": lib2})
    check_refused(r, lower, mnt, ["needs libfuse 3", "libfuse.so.2"])


def test_good_input_mounts_and_leaves_lower_unchanged(scene):
    """The control case: the same harness with good input mounts (daemon),
    so the refusals above are refusals and not a broken harness."""
    workdir, lower, mnt = scene
    r = run_shiftfs([str(lower), str(mnt), *STD, "-q"])
    try:
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert os.stat(mnt / "file").st_uid == 101000
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    assert not fuse_mounts_of(lower, mnt)

"""The foundation on real FUSE mounts: ids shown and written through the
table, by callers that are not root, and the lower tree changed only by what
they asked for."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import subprocess
import sys

import pytest

from shiftfs.idmap import Extent, read_overflow_id
from shiftfs.mount import is_mounted, mounts, unmount

from tests.callers import Errno, call_as
from tests.daemon import foreground_daemon, server_pid
from tests.tables import BASE, ROOT_KEPT, STD, args

pytestmark = pytest.mark.needs_root

OVERFLOW_UID = read_overflow_id("uid")
OVERFLOW_GID = read_overflow_id("gid")
U = BASE  # STD table: lower n is upper U + n


def as_user(fn, lower_uid=1000, lower_gid=1000, groups=(), umask=0o022):
    """Run fn as the upper user whose lower ids are given (STD table)."""
    return call_as(fn, uid=U + lower_uid, gid=U + lower_gid,
                   groups=[U + g for g in groups], umask=umask)


def make_tree(lower):
    (lower / "root_file").write_text("r")
    (lower / "user_file").write_text("u")
    (lower / "far_file").write_text("f")
    (lower / "shared").mkdir(mode=0o777)
    os.chmod(lower / "shared", 0o777)
    os.chown(lower / "user_file", 1000, 1000)
    os.chown(lower / "far_file", 70000, 70000)


def lower_ids(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid


# ---- what is shown ----

def test_stat_shows_lower_ids_through_the_table(lower, shifted):
    make_tree(lower)
    assert lower_ids(shifted / "root_file") == (U, U)
    assert lower_ids(shifted / "user_file") == (U + 1000, U + 1000)
    assert lower_ids(shifted / "far_file") == (OVERFLOW_UID, OVERFLOW_GID)
    assert lower_ids(shifted) == (U, U)  # the root of the mount too


def test_listing_shows_the_same_ids_as_stat(lower, shifted):
    make_tree(lower)
    out = subprocess.run(["ls", "-ln", str(shifted)], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[-1]: line.split()[2:4] for line in out.splitlines()[1:]}
    assert rows["user_file"] == [str(U + 1000), str(U + 1000)]
    assert rows["far_file"] == [str(OVERFLOW_UID), str(OVERFLOW_GID)]


def test_large_directory_lists_every_entry_once(lower, shifted):
    names = {f"entry-with-a-longish-name-{i:05d}" for i in range(3000)}
    for n in names:
        (lower / n).touch()
    assert set(os.listdir(shifted)) == names
    with os.scandir(shifted) as it:  # the readdirplus path carries attributes
        seen = {e.name: e.stat(follow_symlinks=False).st_uid for e in it}
    assert set(seen) == names and set(seen.values()) == {U}


def test_inode_numbers_are_the_lower_ones_and_hard_links_share_them(lower, shifted):
    make_tree(lower)
    as_user(lambda: os.link(shifted / "user_file", shifted / "shared" / "hard"))
    assert os.stat(shifted / "shared" / "hard").st_ino == os.stat(shifted / "user_file").st_ino
    assert os.stat(shifted / "shared" / "hard").st_ino == os.stat(lower / "user_file").st_ino
    # a fresh name shows the new count; the old name's cached attributes may
    # lag by up to attr_timeout (libfuse's high-level API gives each name its own node)
    assert os.stat(shifted / "shared" / "hard").st_nlink == 2


def test_root_daemon_serves_the_protocol_itself_without_libfuse(lower, shifted):
    """A root daemon mounts with fsopen/fsmount and reads /dev/fuse itself:
    no libfuse (2 or 3) is loaded into it at all."""
    pids = subprocess.run(["pgrep", "-f", f"shiftfs.*{shifted}"], capture_output=True,
                          text=True).stdout.split()
    assert pids, "daemon not found"
    maps = open(f"/proc/{pids[0]}/maps").read()
    assert os.listdir(shifted) is not None
    assert "libfuse3.so" not in maps
    assert "libfuse.so.2" not in maps


# ---- what is written ----

def test_new_entries_belong_to_the_mapped_caller(lower, shifted):
    make_tree(lower)

    def create_all():
        os.chdir(shifted / "shared")
        with open("file", "w") as f:
            f.write("x")
        os.mkdir("dir")
        os.symlink("file", "link")
        os.mkfifo("fifo")
        os.mknod("sock", stat.S_IFSOCK | 0o644)
        return sorted(os.listdir("."))

    assert as_user(create_all) == ["dir", "fifo", "file", "link", "sock"]
    for name in ("file", "dir", "link", "fifo", "sock"):
        assert lower_ids(lower / "shared" / name) == (1000, 1000), name
        assert lower_ids(shifted / "shared" / name) == (U + 1000, U + 1000), name


def test_new_file_mode_follows_the_callers_umask(lower, shifted):
    make_tree(lower)

    def create():
        fd = os.open(shifted / "shared" / "m", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.mkdir(shifted / "shared" / "d", 0o777)

    as_user(create, umask=0o027)
    assert stat.S_IMODE(os.stat(lower / "shared" / "m").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(lower / "shared" / "d").st_mode) == 0o750


def test_creates_by_callers_in_turn_get_each_callers_ids_and_umask(lower, shifted):
    """A serving thread keeps the fsuid, fsgid and umask of the last create
    (it sets them only where they differ): each create in turn, by two
    callers and with umasks that change, still gets its own caller's."""
    make_tree(lower)
    turns = [(1000, 1000, 0o022), (2000, 3000, 0o077), (2000, 3000, 0o022),
             (1000, 1000, 0o022), (1000, 2000, 0o002), (1000, 1000, 0o027)]
    for i, (uid, gid, umask) in enumerate(turns):
        def create(i=i):
            os.close(os.open(shifted / "shared" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(shifted / "shared" / f"d{i}", 0o777)
        as_user(create, lower_uid=uid, lower_gid=gid, umask=umask)
        for name, mode in ((f"f{i}", 0o666), (f"d{i}", 0o777)):
            st = os.lstat(lower / "shared" / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode & ~umask), name


def test_a_whiteout_is_the_daemons_after_a_callers_create(lower, mounter):
    """rename(RENAME_WHITEOUT) (host root, which the table maps) makes an
    inode outside a create: the daemon's own ids, as before, not those a
    caller's create left on the thread."""
    make_tree(lower)
    shifted = mounter(lower, uidmap=ROOT_KEPT)
    as_user(lambda: open(shifted / "shared" / "mine", "w").close())
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, whiteout = -100, 4
    src, dst = (str(shifted / "shared" / n).encode() for n in ("mine", "moved"))
    if libc.renameat2(at_fdcwd, src, at_fdcwd, dst, whiteout) != 0:
        pytest.skip(f"RENAME_WHITEOUT: {os.strerror(ctypes.get_errno())}")
    st = os.lstat(lower / "shared" / "mine")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert lower_ids(lower / "shared" / "moved") == (1000, 1000)


def _fsuids(pid: int) -> set[int]:
    """The fsuid of each thread of ``pid`` (the fourth Uid: field)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out |= {int(line.split()[4]) for line in f if line.startswith("Uid:")}
    return out


@pytest.mark.parametrize("lower_kind", ["local", "FUSE"])
def test_a_create_leaves_the_callers_fsuid_only_over_a_local_lower(lower, workdir, lower_kind):
    """Over a local lower a serving thread keeps the fsuid of the last
    create (the lower decides by the daemon's capabilities); over a FUSE
    (or network) lower, whose daemon (or server) sees the fsuid of every
    call, the daemon's own ids come back after each create."""
    import shutil
    if lower_kind == "FUSE" and not shutil.which("bindfs"):
        pytest.skip("bindfs not installed")
    make_tree(lower)
    served, mnt = lower, workdir / "mnt"
    mnt.mkdir()
    with contextlib.ExitStack() as stack:
        if lower_kind == "FUSE":
            served = workdir / "fuse-lower"
            served.mkdir()
            subprocess.run(["bindfs", "-o", "allow_other", str(lower), str(served)], check=True)
            stack.callback(lambda: subprocess.run(["umount", "-l", str(served)], check=False))
        daemon = stack.enter_context(foreground_daemon(served, mnt, *args(STD),
                                                       log=workdir / "log"))
        as_user(lambda: open(mnt / "shared" / "new", "w").close())
        assert lower_ids(lower / "shared" / "new") == (1000, 1000)
        assert _fsuids(server_pid(mnt)) == ({0, 1000} if lower_kind == "local" else {0})


def test_default_acl_of_the_parent_is_inherited(lower, shifted):
    make_tree(lower)
    subprocess.run(["setfacl", "-d", "-m", "u:5:rwx,g::rwx,o::-", str(lower / "shared")], check=True)
    as_user(lambda: open(shifted / "shared" / "inherit", "w").close(), umask=0o077)
    acl = subprocess.run(["getfacl", "-n", "-p", str(lower / "shared" / "inherit")],
                         capture_output=True, text=True, check=True).stdout
    # lower id, from the lower default ACL; the mask is the create mode's group bits, not the umask's
    assert "user:5:rwx\t#effective:rw-" in acl and "mask::rw-" in acl
    shown = subprocess.run(["getfacl", "-n", "-p", str(shifted / "shared" / "inherit")],
                           capture_output=True, text=True, check=True).stdout
    assert f"user:{U + 5}:rwx" in shown


def test_unmapped_caller_gets_eoverflow_and_nothing_is_created(lower, shifted):
    make_tree(lower)
    target = shifted / "shared" / "nope"
    assert call_as(lambda: open(target, "w").close(), uid=5000, gid=5000) == Errno(errno.EOVERFLOW)
    assert call_as(lambda: os.mkdir(target), uid=U + 1, gid=5000) == Errno(errno.EOVERFLOW)
    assert call_as(lambda: os.symlink("x", target), uid=5000, gid=U + 1) == Errno(errno.EOVERFLOW)
    assert not os.path.lexists(lower / "shared" / "nope")
    # host root is unmapped in this table too
    with pytest.raises(OSError) as exc:
        open(target, "w").close()
    assert exc.value.errno == errno.EOVERFLOW
    assert os.listdir(lower / "shared") == []


def test_root_mapped_table_creates_device_nodes_as_mapped_root(lower, mounter):
    table = [Extent(1000, 0, 1), Extent(0, 100000, 1000)]
    mp = mounter(lower, uidmap=table)
    os.mknod(mp / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mkdir(mp / "d")
    st = os.lstat(lower / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert lower_ids(mp / "null") == (0, 0)
    # nodev by default: the node cannot be opened through the mount
    with pytest.raises(PermissionError):
        open(mp / "null", "rb")


def test_chown_translates_upper_to_lower(lower, shifted):
    make_tree(lower)
    os.chown(shifted / "user_file", U + 5, U + 7)
    assert lower_ids(lower / "user_file") == (5, 7)
    os.chown(shifted / "user_file", -1, U + 9)
    assert lower_ids(lower / "user_file") == (5, 9)
    os.chown(shifted / "user_file", U + 6, -1)
    assert lower_ids(lower / "user_file") == (6, 9)


def test_chown_to_an_unmapped_id_is_eoverflow_and_changes_nothing(lower, shifted):
    make_tree(lower)
    for uid, gid in ((5, -1), (-1, 5), (U + 70000, U + 1), (4294967294, -1)):
        with pytest.raises(OSError) as exc:
            os.chown(shifted / "user_file", uid, gid)
        assert exc.value.errno == errno.EOVERFLOW
        assert lower_ids(lower / "user_file") == (1000, 1000)


def test_owner_may_chgrp_to_own_supplementary_group_only(lower, shifted):
    make_tree(lower)
    target = shifted / "user_file"
    assert as_user(lambda: os.chown(target, -1, U + 2000), groups=[2000]) is None
    assert lower_ids(lower / "user_file") == (1000, 2000)
    assert as_user(lambda: os.chown(target, -1, U + 3000), groups=[2000]) == Errno(errno.EPERM)
    assert as_user(lambda: os.chown(target, U + 1001, -1)) == Errno(errno.EPERM)
    assert lower_ids(lower / "user_file") == (1000, 2000)


def test_lchown_changes_the_symlink_not_its_target(lower, shifted):
    make_tree(lower)
    os.symlink("user_file", lower / "sl")
    os.lchown(shifted / "sl", U + 3, U + 3)
    assert lower_ids(lower / "sl") == (3, 3)
    assert lower_ids(lower / "user_file") == (1000, 1000)
    assert os.readlink(shifted / "sl") == "user_file"


def test_setgid_directory_passes_group_and_bit_on(lower, shifted):
    make_tree(lower)
    sg = lower / "sg"
    sg.mkdir()
    os.chown(sg, 0, 3000)
    os.chmod(sg, 0o2777)

    def create():
        open(shifted / "sg" / "f", "w").close()
        os.mkdir(shifted / "sg" / "d")

    as_user(create)
    assert lower_ids(lower / "sg" / "f") == (1000, 3000)
    assert lower_ids(lower / "sg" / "d") == (1000, 3000)
    assert os.stat(lower / "sg" / "d").st_mode & stat.S_ISGID
    assert not os.stat(lower / "sg" / "f").st_mode & stat.S_ISGID


# ---- names and times ----

libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags):
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_exchange_really_exchanges(lower, rooted):
    shifted = rooted
    (lower / "a").write_text("A")
    (lower / "b").write_text("B")
    renameat2(shifted / "a", shifted / "b", RENAME_EXCHANGE)
    assert (lower / "a").read_text() == "B" and (lower / "b").read_text() == "A"


def test_rename_noreplace_refuses_to_overwrite(lower, rooted):
    shifted = rooted
    (lower / "a").write_text("A")
    (lower / "b").write_text("B")
    with pytest.raises(FileExistsError):
        renameat2(shifted / "a", shifted / "b", RENAME_NOREPLACE)
    assert (lower / "b").read_text() == "B"
    renameat2(shifted / "a", shifted / "c", RENAME_NOREPLACE)
    assert (lower / "c").read_text() == "A" and not (lower / "a").exists()


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


UTIME_OMIT = (1 << 30) - 2
UTIME_NOW = (1 << 30) - 1


def utimensat(path, atime, mtime):
    times = (Timespec * 2)(atime, mtime)
    if libc.utimensat(-100, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_utimens_honours_omit_and_now_and_nanoseconds(lower, rooted):
    shifted = rooted
    (lower / "t").write_text("t")
    os.utime(lower / "t", ns=(1_000_000_123, 2_000_000_456))
    utimensat(shifted / "t", Timespec(0, UTIME_OMIT), Timespec(1_700_000_000, 789))
    st = os.stat(lower / "t")
    assert st.st_atime_ns == 1_000_000_123  # untouched, not 1970
    assert st.st_mtime_ns == 1_700_000_000_000_000_789
    assert os.stat(shifted / "t").st_mtime_ns == 1_700_000_000_000_000_789
    utimensat(shifted / "t", Timespec(0, UTIME_NOW), Timespec(0, UTIME_OMIT))
    st2 = os.stat(lower / "t")
    assert st2.st_atime_ns > 1_700_000_000_000_000_000
    assert st2.st_mtime_ns == 1_700_000_000_000_000_789


def test_touch_as_owner_sets_both_times_to_now(lower, shifted):
    make_tree(lower)
    os.utime(lower / "user_file", (1, 1))
    as_user(lambda: os.utime(shifted / "user_file"))
    assert os.stat(lower / "user_file").st_mtime > 1_000_000_000


# ---- data ----

@pytest.fixture
def rooted(lower, mounter):
    """Host root keeps lower 0, so root may write (the data tests)."""
    return mounter(lower, uidmap=ROOT_KEPT)


def test_big_file_copied_through_the_mount_compares_equal(lower, rooted):
    shifted = rooted
    data = os.urandom(1 << 20) * 24 + os.urandom(12345)  # 24 MiB and an odd tail
    with open(shifted / "big", "wb") as f:
        f.write(data)
    assert hashlib.sha256((lower / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
    with open(shifted / "big", "rb") as f:
        f.seek(5 << 20)
        assert f.read(3 << 20) == data[5 << 20: 8 << 20]
    assert hashlib.sha256((shifted / "big").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_truncate_and_append(lower, rooted):
    shifted = rooted
    (lower / "f").write_text("0123456789")
    os.truncate(shifted / "f", 4)
    with open(shifted / "f", "a") as f:
        f.write("xy")
    assert (lower / "f").read_text() == "0123xy"


def test_unlinked_open_file_stays_usable_and_leaves_no_hidden_file(lower, rooted):
    shifted = rooted
    with open(shifted / "open", "w+") as f:
        f.write("before")
        f.flush()
        os.unlink(shifted / "open")
        f.write(" after")
        f.flush()
        f.seek(0)
        assert f.read() == "before after"
        assert os.listdir(lower) == []
    assert os.listdir(lower) == []


def test_statfs_is_the_lower_filesystems(lower, shifted):
    a, b = os.statvfs(lower), os.statvfs(shifted)
    assert (a.f_blocks, a.f_bsize, a.f_files) == (b.f_blocks, b.f_bsize, b.f_files)


# ---- xattrs ----

def test_user_xattrs_round_trip(lower, rooted):
    shifted = rooted
    (lower / "x").write_text("x")
    os.setxattr(shifted / "x", "user.note", b"\x00binary\xff")
    assert os.getxattr(lower / "x", "user.note") == b"\x00binary\xff"
    assert "user.note" in os.listxattr(shifted / "x")
    os.removexattr(shifted / "x", "user.note")
    assert "user.note" not in os.listxattr(lower / "x")


def test_acl_ids_cross_the_boundary_both_ways(lower, shifted):
    (lower / "acl").write_text("a")
    subprocess.run(["setfacl", "-m", f"u:{U + 5}:r,g:{U + 6}:rw", str(shifted / "acl")], check=True)
    on_disk = subprocess.run(["getfacl", "-n", "-p", str(lower / "acl")], capture_output=True,
                             text=True, check=True).stdout
    assert "user:5:r--" in on_disk and "group:6:rw-" in on_disk
    shown = subprocess.run(["getfacl", "-n", "-p", str(shifted / "acl")], capture_output=True,
                           text=True, check=True).stdout
    assert f"user:{U + 5}:r--" in shown and f"group:{U + 6}:rw-" in shown
    bad = subprocess.run(["setfacl", "-m", "u:5:r", str(shifted / "acl")], capture_output=True, text=True)
    assert bad.returncode != 0  # upper 5 has no lower id


def test_acl_is_enforced_by_the_kernel(lower, shifted):
    (lower / "secret").write_text("s")
    os.chmod(lower / "secret", 0o600)
    assert as_user(lambda: open(shifted / "secret").read()) == Errno(errno.EACCES)
    subprocess.run(["setfacl", "-m", f"u:{U + 1000}:r", str(shifted / "secret")], check=True)
    assert as_user(lambda: open(shifted / "secret").read()) == "s"


# ---- the command ----

def test_background_mode_returns_once_the_mount_is_live(lower, workdir):
    mp = workdir / "bg"
    mp.mkdir()
    (lower / "f").write_text("f")
    result = subprocess.run([sys.executable, "-m", "shiftfs", "-q", str(lower), str(mp),
                             *args(STD)], capture_output=True, text=True, timeout=30)
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(str(mp))
        assert os.stat(mp / "f").st_uid == U
    finally:
        if is_mounted(str(mp), None):
            unmount(str(mp))
    assert not is_mounted(str(mp), None)


def test_mount_failure_is_one_line_and_nonzero(lower, workdir):
    result = subprocess.run([sys.executable, "-m", "shiftfs", str(lower), str(workdir / "missing"),
                             *args(STD)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert not any(t == "fuse.shiftfs" and str(workdir) in mp for _s, mp, t in mounts())

"""The oracle's own helpers, checked against the kernel: idmapped bind mounts and run-as-caller."""
import errno
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.callers import ChildError, Errno, call_as, call_as_userns_root, errno_of
from tests.oracle.kernel_idmap import idmapped_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, chown, setresuid)")

# Several extents, none of them identity, and different for uid and gid so a
# swapped or reversed map shows up.
UID_EXTENTS = [(0, 100000, 1000), (2000, 3000, 500)]
GID_EXTENTS = [(0, 200000, 1000), (3000, 4000, 10)]
OVERFLOW_UID = int(open("/proc/sys/kernel/overflowuid").read())
OVERFLOW_GID = int(open("/proc/sys/kernel/overflowgid").read())
UNMAPPED_UPPER = 4242  # in no extent's upper range, for uid or gid


def lower_to_upper(extents, lower_id):
    for lower, upper, count in extents:
        if lower <= lower_id < lower + count:
            return upper + lower_id - lower
    return None


def shown(extents, lower_id, overflow_id):
    """What stat through the mount should say for an on-disk id."""
    upper = lower_to_upper(extents, lower_id)
    return overflow_id if upper is None else upper


def upper_to_lower(extents, upper_id):
    return lower_to_upper([(u, l, n) for l, u, n in extents], upper_id)


def mount_points():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def create_file(path, mode=0o644):
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    st = os.stat(path)
    return st.st_uid, st.st_gid


@pytest.fixture
def open_tmp():
    """A temp dir every caller can traverse (pytest's tmp_path sits under a 0700 dir)."""
    work = tempfile.mkdtemp(prefix="shiftfs-callers-")
    os.chmod(work, 0o755)
    try:
        yield pathlib.Path(work)
    finally:
        shutil.rmtree(work)


@pytest.fixture(params=["rootfs", "tmpfs"])
def dirs(request):
    """(lower, target): a lower tree on the root fs or on a fresh tmpfs, and an empty mount point."""
    work = tempfile.mkdtemp(prefix="shiftfs-oracle-")
    os.chmod(work, 0o755)  # callers other than root must reach the mount
    lower, target = os.path.join(work, "lower"), os.path.join(work, "target")
    os.mkdir(lower)
    os.mkdir(target)
    tmpfs = request.param == "tmpfs"
    if tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "shiftfs-oracle", lower], check=True)
    try:
        yield lower, target
    finally:
        # Only the tmpfs lower may still be mounted here; anything else is a helper bug.
        leftover = [p for p in mount_points() if p.startswith(work + "/") and not (tmpfs and p == lower)]
        for p in reversed(leftover):
            subprocess.run(["umount", "-l", p])
        if tmpfs:
            subprocess.run(["umount", lower], check=True)
        shutil.rmtree(work)
        assert not leftover, f"mounts left behind: {leftover}"


def test_stat_shows_upper_ids(dirs):
    lower, target = dirs
    lower_uids = [0, 5, 999, 2000, 2499, 1000, 2500, 100000]
    lower_gids = [0, 999, 3000, 3009, 1000, 3010, 200000, 4000]
    for i, (uid, gid) in enumerate(zip(lower_uids, lower_gids)):
        create_file(os.path.join(lower, f"f{i}"))
        os.chown(os.path.join(lower, f"f{i}"), uid, gid)
    expected = {f"f{i}": (shown(UID_EXTENTS, uid, OVERFLOW_UID), shown(GID_EXTENTS, gid, OVERFLOW_GID))
                for i, (uid, gid) in enumerate(zip(lower_uids, lower_gids))}
    assert expected["f2"] == (100999, 4000) and expected["f5"] == (OVERFLOW_UID, OVERFLOW_GID)

    with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
        seen = {name: (os.lstat(os.path.join(target, name)).st_uid, os.lstat(os.path.join(target, name)).st_gid)
                for name in os.listdir(target)}
        root = os.stat(target)
    assert seen == expected
    assert (root.st_uid, root.st_gid) == (100000, 200000)  # the lower root dir is 0:0
    # Looking does not touch the lower tree.
    assert [os.lstat(os.path.join(lower, f"f{i}")).st_uid for i in range(len(lower_uids))] == lower_uids


def test_new_file_from_upper_caller_lands_as_lower(dirs):
    lower, target = dirs
    drop = os.path.join(lower, "drop")
    os.mkdir(drop, 0o755)
    os.chown(drop, 2000, 3000)
    upper_uid, upper_gid = lower_to_upper(UID_EXTENTS, 2000), lower_to_upper(GID_EXTENTS, 3000)
    with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
        seen_by_owner = call_as(create_file, os.path.join(target, "drop", "new"), uid=upper_uid, gid=upper_gid)
        # Write permission on drop follows its upper owner: another mapped user is refused.
        other = call_as(create_file, os.path.join(target, "drop", "other"), uid=100005, gid=upper_gid)
    assert seen_by_owner == (upper_uid, upper_gid)
    st = os.stat(os.path.join(drop, "new"))
    assert (st.st_uid, st.st_gid) == (upper_to_lower(UID_EXTENTS, upper_uid), upper_to_lower(GID_EXTENTS, upper_gid))
    assert (st.st_uid, st.st_gid) == (2000, 3000)
    assert other == Errno(errno.EACCES)


@pytest.mark.parametrize("op", ["create", "mkdir", "symlink"])
@pytest.mark.parametrize("uid,gid", [(UNMAPPED_UPPER, 4000), (3000, UNMAPPED_UPPER), (0, 0)],
                         ids=["uid-unmapped", "gid-unmapped", "root-unmapped"])
def test_unmapped_caller_cannot_create(dirs, op, uid, gid):
    lower, target = dirs
    os.mkdir(os.path.join(lower, "open"))
    os.chmod(os.path.join(lower, "open"), 0o777)
    path = os.path.join(target, "open", "x")
    fn = {"create": create_file, "mkdir": os.mkdir, "symlink": lambda p: os.symlink("dangling", p)}[op]
    with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
        assert os.path.isdir(os.path.join(target, "open"))
        result = call_as(fn, path, uid=uid, gid=gid)
    assert result == Errno(errno.EOVERFLOW)
    assert os.listdir(os.path.join(lower, "open")) == []


def test_mount_is_gone_after_exit_even_on_error(dirs):
    lower, target = dirs
    with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
        assert target in mount_points()
    assert target not in mount_points()
    with pytest.raises(RuntimeError, match="body failed"):
        with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
            assert mount_points().count(target) == 1
            raise RuntimeError("body failed")
    assert target not in mount_points()
    # A busy mount (open file inside) is still removed, by MNT_DETACH.
    create_file(os.path.join(lower, "busy"))
    with idmapped_mount(lower, target, UID_EXTENTS, GID_EXTENTS):
        fd = os.open(os.path.join(target, "busy"), os.O_RDONLY)
    try:
        assert target not in mount_points()
    finally:
        os.close(fd)


def test_refusals_are_clear(dirs):
    lower, target = dirs
    with pytest.raises(ValueError, match="at least one extent"):
        with idmapped_mount(lower, target, [], GID_EXTENTS):
            pass
    with pytest.raises(OSError, match="uid_map") as exc:
        with idmapped_mount(lower, target, [(0, 0, 10), (5, 100, 1)], GID_EXTENTS):
            pass
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError, match=r"\(proc\) probably does not support idmapped mounts"):
        with idmapped_mount("/proc", target, UID_EXTENTS, GID_EXTENTS):
            pass
    assert target not in mount_points()


def test_call_as_credentials_and_errno(open_tmp):
    secret = open_tmp / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    public = open_tmp / "public"
    public.write_text("p")
    creds = call_as(lambda: (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())),
                    uid=1234, gid=5678, groups=[7, 8])
    assert creds == (1234, 1234, 5678, 5678, [7, 8])
    result = call_as(lambda: secret.read_text(), uid=1234, gid=5678)
    assert result == Errno(errno.EACCES)
    assert call_as(public.read_text, uid=1234, gid=5678) == "p"  # so EACCES above is the file's mode, not the path
    assert repr(result) == "Errno(EACCES)" and errno_of(result) == errno.EACCES
    assert call_as(secret.read_text, uid=0, gid=0) == "x" and errno_of("x") is None
    assert call_as(os.umask, 0, uid=1234, gid=5678, umask=0o027) == 0o027


def test_call_as_reraises_and_times_out():
    with pytest.raises(ValueError, match="invalid literal") as exc:
        call_as(int, "not a number", uid=1234, gid=1234)
    assert any("Traceback" in note and "ValueError" in note for note in exc.value.__notes__)

    class Local(Exception):  # a local class cannot be pickled: comes back as traceback text
        pass

    def raise_local():
        raise Local("from the child")

    with pytest.raises(ChildError, match="Local: from the child"):
        call_as(raise_local, uid=1234, gid=1234)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        call_as(time.sleep, 30, uid=1234, gid=1234, call_timeout=1)
    assert time.monotonic() - start < 10


def test_call_as_userns_root():
    def inside():
        with open("/proc/self/uid_map") as u, open("/proc/self/gid_map") as g:
            maps = [[tuple(map(int, line.split())) for line in f] for f in (u, g)]
        with open("/proc/self/status") as f:
            cap_eff = int(next(l for l in f if l.startswith("CapEff:")).split()[1], 16)
        return os.getuid(), os.getgid(), os.getgroups(), maps, cap_eff, os.readlink("/proc/self/ns/user")

    uid, gid, groups, maps, cap_eff, userns = call_as_userns_root(
        inside, uid_extents=UID_EXTENTS, gid_extents=GID_EXTENTS)
    assert (uid, gid, groups) == (0, 0, [])
    assert maps == [UID_EXTENTS, GID_EXTENTS]
    assert cap_eff & (1 << 21)  # CAP_SYS_ADMIN, in its own namespace
    assert userns != os.readlink("/proc/self/ns/user")
    assert call_as_userns_root(lambda: os.readlink("/proc/self/ns/mnt"), uid_extents=UID_EXTENTS,
                               gid_extents=GID_EXTENTS, new_mount_ns=True) != os.readlink("/proc/self/ns/mnt")


def test_container_root_is_not_host_root(open_tmp):
    """Inside id 0 is outside (upper) id 100000 on disk, and its capabilities stop at ids it cannot map."""
    host_only = open_tmp / "host_only"  # 0:0 on disk, which the namespace does not map
    host_only.write_text("x")
    host_only.chmod(0o600)
    mine = open_tmp / "mine"
    mine.write_text("y")
    mine.chmod(0o600)
    os.chown(mine, lower_to_upper(UID_EXTENTS, 0), lower_to_upper(GID_EXTENTS, 0))
    os.chmod(open_tmp, 0o777)

    def inside():
        results = []
        for path in (host_only, mine):
            try:
                results.append(path.read_text())
            except OSError as e:
                results.append(Errno(e.errno))
        create_file(open_tmp / "made_inside")
        return results

    got = call_as_userns_root(inside, uid_extents=UID_EXTENTS, gid_extents=GID_EXTENTS)
    assert got == [Errno(errno.EACCES), "y"]
    st = os.stat(open_tmp / "made_inside")
    assert (st.st_uid, st.st_gid) == (lower_to_upper(UID_EXTENTS, 0), lower_to_upper(GID_EXTENTS, 0))

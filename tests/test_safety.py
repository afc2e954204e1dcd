"""Safe by default: nosuid,nodev unless asked (and then a loud warning),
nothing outside the lower root is ever touched on behalf of a path inside
the mount whatever the tree contains or however it changes, a lower tree
swapped under the mount is not followed, and trusted.*/security.* xattrs
only for callers the kernel allows."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shiftfs.idmap import Extent, build_idmap
from shiftfs.mount import mount, mounts

from tests.callers import Errno, call_as, call_as_userns_root
from tests.tables import ROOT_KEPT, STD, args, upper_of
from tests.test_bad_input import listing, run_shiftfs

pytestmark = pytest.mark.needs_root

USER = upper_of(1000, STD)  # 101000: upper id of lower 1000 under both tables


def mount_opts(mp) -> set[str]:
    """Per-mount options of mp from /proc/self/mountinfo (field 6)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mp):
                return set(fields[5].split(","))
    raise AssertionError(f"{mp} is not mounted")


class Daemon:
    """shiftfs run as a user would (daemonizing), its stderr kept; always
    unmounted at exit."""

    def __init__(self, lower, mnt, extents, *opts):
        self.mnt = mnt
        self.result = run_shiftfs([str(lower), str(mnt), "-q", *args(extents), *opts])

    def __enter__(self):
        assert self.result.returncode == 0, self.result.stderr
        return self

    def __exit__(self, *exc):
        if any(m[1] == str(self.mnt) for m in mounts()):
            r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if r.returncode:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


# ---- default flags, suid/dev ----------------------------------------------------

def test_default_is_nosuid_nodev(shifted):
    opts = mount_opts(shifted)
    assert {"nosuid", "nodev"} <= opts


def test_suid_dev_honoured_with_one_line_warnings(lower, workdir):
    mnt = workdir / "m"
    mnt.mkdir()
    with Daemon(lower, mnt, ROOT_KEPT, "-o", "suid", "-o", "dev") as d:
        opts = mount_opts(mnt)
        assert not {"nosuid", "nodev"} & opts
        lines = d.result.stderr.strip().splitlines()
        assert len(lines) == 2, d.result.stderr
        suid_line = [ln for ln in lines if "suid" in ln]
        assert len(suid_line) == 1 and "lower uid 0 shown as upper 0" in suid_line[0] \
            and "runs as root on this host" in suid_line[0]
        assert any("-o dev" in ln and "device nodes" in ln for ln in lines)


def test_suid_without_root_in_table_is_quiet_unless_host_user(lower, workdir):
    import pwd
    mnt = workdir / "m"
    mnt.mkdir()
    table = [Extent(0, 300000, 65536)]
    host_users = [p for p in pwd.getpwall() if 300000 <= p.pw_uid < 365536]
    with Daemon(lower, mnt, table, "-o", "suid") as d:
        assert "nosuid" not in mount_opts(mnt)
        if host_users:
            assert "host user" in d.result.stderr
        else:
            assert d.result.stderr == ""


def test_suid_warns_for_a_real_host_user(lower, workdir):
    import pwd
    user = next(p for p in pwd.getpwall() if 0 < p.pw_uid < 65534)
    mnt = workdir / "m"
    mnt.mkdir()
    table = [Extent(5, user.pw_uid, 1)]
    with Daemon(lower, mnt, table, "-o", "suid") as d:
        lines = d.result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"'{user.pw_name}'" in lines[0] and "lower uid 5" in lines[0]


def _run_id(path):
    return subprocess.run([path, "-u"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("suid", [False, True])
def test_setuid_root_binary_only_with_suid(lower, mounter, suid):
    """A set-uid file owned by lower 0 shown as upper 0 is a set-uid-root
    file on the host: it must not take effect unless -o suid was asked for."""
    shutil.copy("/usr/bin/id", lower / "sid")
    os.chown(lower / "sid", 0, 0)
    os.chmod(lower / "sid", 0o4755)
    mp = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "suid"] if suid else [])
    assert os.stat(mp / "sid").st_uid == 0 and os.stat(mp / "sid").st_mode & 0o4000
    euid = call_as(_run_id, str(mp / "sid"), uid=1000, gid=1000)
    assert euid == ("0" if suid else "1000")


@pytest.mark.parametrize("dev", [False, True])
def test_device_nodes_only_with_dev(lower, mounter, dev):
    os.mknod(lower / "null", 0o20666, os.makedev(1, 3))
    os.chmod(lower / "null", 0o666)
    mp = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "dev"] if dev else [])

    def open_it():
        fd = os.open(mp / "null", os.O_WRONLY)
        os.write(fd, b"x")
        os.close(fd)
        return "opened"

    assert call_as(open_it, uid=USER, gid=USER) == ("opened" if dev else Errno(errno.EACCES))


# ---- hostile trees ------------------------------------------------------------

@pytest.fixture
def hostile(workdir):
    """lower with symlinks pointing out (absolute, relative, to a directory,
    dangling), next to an 'outside' tree that must never change. The mount
    point sits one level deeper than lower, so '../outside' from inside the
    mount and from inside lower name different places."""
    outside = workdir / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_text("host secret\n")
    os.chmod(outside / "secret", 0o600)
    (outside / "dir" / "f").write_text("outside file\n")
    lower = workdir / "lower"
    (lower / "d" / "sub").mkdir(parents=True)
    os.chown(lower, 1000, 1000)  # the mapped user may rename and unlink at the top
    (lower / "d" / "f").write_text("inside\n")
    os.chown(lower / "d", 1000, 1000)
    os.chown(lower / "d" / "f", 1000, 1000)
    for name, target in (("abs-dir", outside / "dir"), ("abs-file", outside / "secret"),
                         ("rel-dir", "../outside/dir"), ("rel-file", "../outside/secret"),
                         ("dotdot", "d/../../outside"), ("dangling", outside / "new-file")):
        os.symlink(target, lower / name)
        os.lchown(lower / name, 1000, 1000)
    os.symlink("../../outside/dir", lower / "d" / "up-dir")
    (workdir / "deeper").mkdir()
    mnt = workdir / "deeper" / "mnt"
    mnt.mkdir()
    before = listing(outside)
    yield lower, mnt, outside
    assert listing(outside) == before, "something outside the lower tree changed"


def test_symlinks_are_shown_not_followed_by_the_daemon(hostile, mounter):
    lower, mnt, outside = hostile
    mp = mounter(lower, uidmap=ROOT_KEPT)
    for name in ("abs-dir", "abs-file", "rel-dir", "rel-file", "dotdot", "dangling"):
        st = os.lstat(mp / name)
        assert (st.st_mode & 0o170000) == 0o120000 and st.st_uid == USER
        assert os.readlink(mp / name) == os.readlink(lower / name)


def outcome(fn):
    """"ok", or the errno fn() failed with."""
    try:
        fn()
        return "ok"
    except OSError as e:
        return e.errno


def test_operations_on_symlinks_stay_inside(hostile, mounter):
    """Every operation that works on a link itself (not through it), by root
    and by a mapped user: the links change, nothing outside does."""
    lower, mnt, outside = hostile
    mp = mounter(lower, uidmap=ROOT_KEPT)

    def as_user():
        out = {}
        for name in ("abs-dir", "abs-file", "rel-file", "dangling"):
            p = str(mp / name)
            os.chown(p, USER, USER, follow_symlinks=False)
            os.utime(p, ns=(1, 1), follow_symlinks=False)
            try:
                os.setxattr(p, "user.x", b"1", follow_symlinks=False)
                out[name + "-setxattr"] = "ok"
            except OSError as e:
                out[name + "-setxattr"] = e.errno
            try:
                os.chmod(p, 0o777, follow_symlinks=False)
                out[name + "-lchmod"] = "ok"
            except (OSError, NotImplementedError) as e:
                out[name + "-lchmod"] = getattr(e, "errno", "n/a")
        os.rename(mp / "abs-file", mp / "d" / "moved-link")
        os.link(mp / "d" / "moved-link", mp / "d" / "hard-link", follow_symlinks=False)
        os.unlink(mp / "d" / "moved-link")
        os.unlink(mp / "rel-file")
        return out

    out = call_as(as_user, uid=USER, gid=USER)
    assert out["abs-dir-setxattr"] == errno.EPERM  # user.* on a symlink: the kernel says no
    assert os.readlink(lower / "d" / "hard-link") == str(outside / "secret")
    assert not os.path.lexists(lower / "rel-file")
    assert os.lstat(lower / "abs-dir").st_mtime_ns == 1
    # and root on the links: truncate/chown of the link itself
    os.chown(mp / "dangling", 0, 0, follow_symlinks=False)
    assert os.lstat(lower / "dangling").st_uid == 0
    assert not os.path.lexists(outside / "new-file")


def test_paths_through_symlinks_resolve_in_the_callers_view(hostile):
    """The kernel resolves symlinks above shiftfs, in the caller's view:
    a relative link that points out of lower resolves against the mount
    point's location, never against the lower tree's; and the daemon's
    privileges never apply on the far side."""
    lower, mnt, outside = hostile
    with mount(str(lower), str(mnt), uidmap=ROOT_KEPT) as mp:
        _through_symlinks(lower, Path(mp), outside)


def _through_symlinks(lower, mp, outside):

    def as_user():
        out = {}
        for what, fn in (
                ("create-abs-dir", lambda: open(mp / "abs-dir" / "planted", "w").close()),
                ("write-abs-file", lambda: open(mp / "abs-file", "a").close()),
                ("read-abs-file", lambda: open(mp / "abs-file").read()),
                ("create-rel-dir", lambda: open(mp / "rel-dir" / "planted", "w").close()),
                ("create-dotdot", lambda: os.mkdir(mp / "dotdot" / "planted")),
                ("create-up-dir", lambda: open(mp / "d" / "up-dir" / "planted", "w").close()),
                ("create-dangling", lambda: open(mp / "dangling", "w").close())):
            out[what] = outcome(fn)
        return out

    out = call_as(as_user, uid=USER, gid=USER)
    # absolute links: the host's own files with the host's own permissions
    assert out["create-abs-dir"] == errno.EACCES
    assert out["write-abs-file"] == errno.EACCES
    assert out["read-abs-file"] == errno.EACCES
    assert out["create-dangling"] == errno.EACCES
    # relative links resolve from the mount point: deeper/outside does not exist
    assert out["create-rel-dir"] == errno.ENOENT
    assert out["create-dotdot"] == errno.ENOENT
    # d/up-dir -> ../../outside/dir from <mnt>/d is <deeper>/outside/dir: ENOENT
    assert out["create-up-dir"] == errno.ENOENT
    # '..' leaves the mount in the caller's view, not the lower's
    assert os.stat(mp / "d" / ".." / "..").st_ino == os.stat(mp.parent).st_ino
    assert os.stat(mp / "d" / "..").st_ino == os.stat(lower).st_ino  # use_ino: lower root


def _tree_of(path: Path) -> dict:
    """Every entry below ``path`` with its type, mode and content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(path))] = (st.st_mode, st.st_uid, p.read_bytes()
                                             if p.is_file() and not p.is_symlink() else None)
    return out


def test_symlink_planted_through_another_mount_is_not_followed(hostile, mounter):
    """Two mounts of one lower (the sharing use case). A caller holds a
    directory open in mount B, then through mount A renames it away and puts
    a symlink to the host in its place. Mount B's kernel still holds the
    directory's node, and the daemon works on that inode (now d-away), as
    a local filesystem would: nothing reaches the symlink's target (the old
    path-based core read host secrets as root here)."""
    lower, mnt, outside = hostile
    before = _tree_of(outside)
    mp_a = mounter(lower, uidmap=ROOT_KEPT)
    mp_b = mounter(lower, uidmap=ROOT_KEPT)

    def attack():
        out = {}
        dfd = os.open(mp_b / "d", os.O_RDONLY | os.O_DIRECTORY)
        os.rename(mp_a / "d", mp_a / "d-away")
        os.symlink(outside, mp_a / "d")
        for what, fn in (
                ("read", lambda: os.read(os.open("secret", os.O_RDONLY, dir_fd=dfd), 100)),
                ("read-inside", lambda: os.read(os.open("f", os.O_RDONLY, dir_fd=dfd), 100)),
                ("stat", lambda: os.stat("secret", dir_fd=dfd).st_size),
                ("mkdir", lambda: os.mkdir("planted", dir_fd=dfd)),
                ("create", lambda: os.open("planted-file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)),
                ("unlink", lambda: os.unlink("f", dir_fd=os.open("dir", os.O_RDONLY, dir_fd=dfd))),
                ("listdir", lambda: os.listdir(os.open("dir", os.O_RDONLY, dir_fd=dfd)))):
            out[what] = outcome(fn)
        return out

    out = call_as(attack, uid=USER, gid=USER)  # lower 1000 owns d
    assert _tree_of(outside) == before
    assert out["read"] == errno.ENOENT and out["stat"] == errno.ENOENT, out  # no secret in d-away
    assert out["read-inside"] == "ok", out  # the file in d-away
    assert out["unlink"] == errno.ENOENT and out["listdir"] == errno.ENOENT, out
    assert (lower / "d-away" / "planted").is_dir() and (lower / "d-away" / "planted-file").is_file()


def test_symlink_swapped_in_on_the_lower_side_is_not_followed(hostile, mounter):
    """Same, with the swap made directly on the lower tree (a host user who
    owns a lower directory can do this) while a file in it is known to the
    kernel: chmod, chown, truncate, xattrs, open, unlink and mkdir through
    the old directory fd act on the directory that moved (d-away), never on
    <outside>/<name>."""
    lower, mnt, outside = hostile
    (lower / "d" / "secret").write_text("inner secret\n")
    before = _tree_of(outside)
    mp = mounter(lower, uidmap=ROOT_KEPT)
    dfd = os.open(mp / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.stat("secret", dir_fd=dfd)  # known to the kernel now
        os.rename(lower / "d", lower / "d-away")
        os.symlink(outside, lower / "d")
        results = {}
        for what, fn in (
                ("chmod", lambda: os.chmod("secret", 0o666, dir_fd=dfd)),
                ("truncate", lambda: os.truncate(f"/proc/self/fd/{dfd}/secret", 3)),
                ("setxattr", lambda: os.setxattr(f"/proc/self/fd/{dfd}/secret", "user.x", b"1")),
                ("open", lambda: os.close(os.open("secret", os.O_RDWR, dir_fd=dfd))),
                ("mkdir", lambda: os.mkdir("planted", dir_fd=dfd))):
            results[what] = outcome(fn)
        moved = lower / "d-away" / "secret"
        assert (moved.stat().st_mode & 0o777, moved.read_text()) == (0o666, "inn"), results
        assert os.getxattr(moved, "user.x") == b"1"
        assert (lower / "d-away" / "planted").is_dir()
        assert outcome(lambda: os.unlink("secret", dir_fd=dfd)) == "ok" and not moved.exists()
        assert _tree_of(outside) == before
    finally:
        os.close(dfd)


def test_daemon_never_follows_a_final_symlink():
    """The operations themselves, without a kernel in front: a node that is
    a symlink is never followed (mode, size, open, xattrs act on the link
    or refuse), and a symlink used as a directory gives ENOTDIR."""
    import tempfile

    from shiftfs.filesystem import SET_ATTR_MODE, SET_ATTR_SIZE, Context, SetAttr
    from shiftfs.ops import Operations
    base = Path(tempfile.mkdtemp(prefix="shiftfs-ops-", dir="/tmp"))
    try:
        (base / "lower").mkdir()
        target = base / "target"
        target.write_text("keep me\n")
        os.chmod(target, 0o600)
        os.setxattr(target, "user.x", b"target's")
        os.symlink(target, base / "lower" / "link")
        (base / "lower" / "dir").mkdir()
        os.symlink(base, base / "lower" / "dir" / "up")
        ops = Operations(str(base / "lower"), build_idmap(ROOT_KEPT, []))
        ctx = Context(0, 0, os.getpid())
        link = ops.lookup(ctx, 1, b"link").node_id
        up = ops.lookup(ctx, ops.lookup(ctx, 1, b"dir").node_id, b"up").node_id

        def attr(valid):
            return SetAttr(valid, 0o100777, 0, 0, 0, (0, 0), (0, 0))
        for call in (lambda: ops.setattr(ctx, link, attr(SET_ATTR_MODE), None),
                     lambda: ops.setattr(ctx, link, attr(SET_ATTR_SIZE), None),
                     lambda: ops.lookup(ctx, up, b"target"),
                     lambda: ops.open(ctx, link, os.O_RDWR),
                     lambda: ops.opendir(ctx, up),
                     lambda: ops.getxattr(ctx, link, b"user.x"),
                     lambda: ops.setxattr(ctx, link, b"user.x", b"1", 0)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTDIR,
                                        errno.EPERM, errno.EACCES, errno.ENODATA), info.value
        assert os.readlink(base / "lower" / "link") == str(target)
        ops.destroy()
        assert target.read_text() == "keep me\n" and (target.stat().st_mode & 0o777) == 0o600
        assert os.getxattr(target, "user.x") == b"target's"
    finally:
        shutil.rmtree(base)


# ---- lower swapped under the mount ------------------------------------------------

def test_lower_swapped_under_the_mount_keeps_serving_the_original(workdir, mounter):
    """shiftfs holds the lower root open: renaming the lower directory away
    and putting another in its place does not change what the mount shows,
    and writes keep going to the original directory (wherever it now is)."""
    lower = workdir / "lower"
    lower.mkdir()
    (lower / "original").write_text("1\n")
    mp = mounter(lower, uidmap=ROOT_KEPT)
    os.rename(lower, workdir / "lower-away")
    lower.mkdir()
    (lower / "impostor").write_text("2\n")
    assert sorted(os.listdir(mp)) == ["original"]
    (mp / "written-after").write_text("3\n")
    assert (workdir / "lower-away" / "written-after").read_text() == "3\n"
    assert sorted(os.listdir(lower)) == ["impostor"]
    # and a directory mounted over the old path is not followed either
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "shiftfs-over", str(lower)], check=True)
    try:
        assert sorted(os.listdir(mp)) == ["original", "written-after"]
    finally:
        subprocess.run(["umount", "-l", str(lower)], check=True)


# ---- trusted.* / security.* -------------------------------------------------------

def test_trusted_and_security_xattrs_only_for_privileged_callers(lower, mounter):
    (lower / "f").write_text("x")
    os.chown(lower / "f", 1000, 1000)
    os.setxattr(lower / "f", "trusted.kept", b"root-only")
    mp = mounter(lower, uidmap=ROOT_KEPT)

    def as_owner():
        out = {}
        for name in ("trusted.x", "security.x", "security.capability"):
            try:
                os.setxattr(mp / "f", name, b"\x01\x00\x00\x02" + b"\x00" * 16)
                out["set " + name] = "ok"
            except OSError as e:
                out["set " + name] = e.errno
        try:
            out["get trusted.kept"] = os.getxattr(mp / "f", "trusted.kept")
        except OSError as e:
            out["get trusted.kept"] = e.errno
        out["list"] = sorted(os.listxattr(mp / "f"))
        os.setxattr(mp / "f", "user.ok", b"1")  # the owner may set user.*
        return out

    out = call_as(as_owner, uid=USER, gid=USER)  # owns f (lower 1000)
    assert out["set trusted.x"] == errno.EPERM
    assert out["set security.x"] == errno.EPERM
    assert out["set security.capability"] == errno.EPERM
    assert out["get trusted.kept"] == errno.ENODATA  # hidden, as on any filesystem
    assert "trusted.kept" not in out["list"]

    # container root (root in a user namespace mapped onto the table) is no better
    def as_container_root():
        try:
            os.setxattr(mp / "f", "trusted.y", b"1")
            return "ok"
        except OSError as e:
            return e.errno

    assert call_as_userns_root(as_container_root, uid_extents=[(0, 100001, 65535)],
                               gid_extents=[(0, 100001, 65535)]) == errno.EPERM
    names = set(os.listxattr(lower / "f"))
    assert names == {"trusted.kept", "user.ok"}, names
    # host root may: through the mount to the lower tree
    os.setxattr(mp / "f", "trusted.byroot", b"r")
    assert os.getxattr(lower / "f", "trusted.byroot") == b"r"

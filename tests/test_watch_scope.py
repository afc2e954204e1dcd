"""Coherence scoped to what the kernel holds (issue 19).

The watcher marks, with fanotify inode marks, only the directories (and the
few files that need one) that the kernel has looked up, so a writer
elsewhere on the lower's filesystem costs the daemon nothing; rootless
daemons may use such marks too. Its invalidations never detach a mount
stacked on the tree that the kernel would keep (FUSE_EXPIRE_ONLY): not for
renames behind the mount, attribute changes, a queue overflow or the fd
shrinker.

Mounts stacked on the tree are checked in /proc/self/mountinfo, never by
walking to them: a walk would look the name up again, which is what may
legitimately drop a mount whose name is gone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import shiftfs

from tests import rootless as namespace
from tests.daemon import foreground_daemon, seen_within, server_pid
from tests.procs import cpu_seconds, fanotify_marks, fd_targets
from tests.tables import ROOT_KEPT, STD, args

pytestmark = pytest.mark.needs_root

LIMIT = 0.1  # a change behind the mount shows within this (issue 19's goal)


def _mount_table(pid="self") -> list[tuple[int, str]]:
    """(mount id, mount point) of each mount, as the kernel has them now."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return [(int(fields[0]), fields[4].encode().decode("unicode_escape"))
                for fields in (line.split() for line in f)]


def _mount_points(pid="self") -> list[str]:
    return [mp for _id, mp in _mount_table(pid)]


def mounted_at(path) -> bool:
    """A mount at exactly ``path``, read from mountinfo without resolving the
    path (no lookup through the FUSE mount)."""
    return str(path) in _mount_points()


@contextlib.contextmanager
def tmpfs_on(path):
    """A tmpfs mounted on a directory inside the shiftfs mount, with a file in
    it; unmounted at the end wherever it is then (it may have followed a
    renamed directory), and nothing if it is gone."""
    subprocess.run(["mount", "-t", "tmpfs", "shiftfs-test-vol", str(path)], check=True)
    mnt_id = [i for i, mp in _mount_table() if mp == str(path)][-1]
    try:
        (Path(path) / "data").write_text("kept")
        yield
    finally:
        for i, mp in _mount_table():
            if i == mnt_id:
                subprocess.run(["umount", "-l", mp], capture_output=True)


def kept(path) -> bool:
    return mounted_at(path) and (Path(path) / "data").read_text() == "kept"


def make_tree(root: Path, dirs: int, files: int) -> int:
    """dirs directories of files files each; the number of paths made."""
    for d in range(dirs):
        (root / f"d{d:03d}").mkdir()
        for i in range(files):
            (root / f"d{d:03d}" / f"f{i:03d}").write_text("x")
    return dirs * (files + 1)


def walk(top) -> int:
    """lstat of every path below ``top`` (what find -ls does); how many."""
    r = subprocess.run(["find", str(top), "-ls"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    return r.stdout.count("\n")


# ---- mounts stacked on the tree are never detached by the watcher's invalidations ----

def test_renames_behind_the_mount_keep_mounts_stacked_on_the_tree(lower, mounter):
    """A sibling's rename and the parent's sibling's: the mount on vol stays.
    vol's own rename behind the mount: it stays, and follows the directory
    to its new name when that is looked up."""
    (lower / "a" / "vol").mkdir(parents=True)
    (lower / "a" / "sib").mkdir()
    (lower / "b").mkdir()
    mp = mounter(lower, uidmap=ROOT_KEPT)
    for p in ("a/vol", "a/sib", "b"):
        os.stat(mp / p)
    assert not os.path.exists(mp / "a" / "later")  # cached as absent
    vol = mp / "a" / "vol"
    with tmpfs_on(vol):
        os.rename(lower / "a" / "sib", lower / "a" / "sib2")
        os.rename(lower / "b", lower / "b2")
        assert seen_within(lambda: os.path.isdir(mp / "a" / "sib2") and os.path.isdir(mp / "b2"),
                           LIMIT) is not None
        assert not os.path.exists(mp / "a" / "sib") and not os.path.exists(mp / "b")
        assert kept(vol)
        os.rename(lower / "a" / "vol", lower / "a" / "moved")
        (lower / "a" / "later").mkdir()  # seen: the watcher got past the rename
        assert seen_within(lambda: os.path.isdir(mp / "a" / "later"), LIMIT) is not None
        assert mounted_at(vol)  # nothing detached
        # the new name looked up: the kernel moves the directory's dentry, and
        # the mount follows it, as on a kernel idmapped mount
        assert os.path.isdir(mp / "a" / "moved")
        assert kept(mp / "a" / "moved") and not mounted_at(vol)


def test_attribute_changes_behind_the_mount_keep_mounts_stacked_on_it(lower, mounter):
    (lower / "vol").mkdir()
    (lower / "f").write_text("x")
    mp = mounter(lower, uidmap=ROOT_KEPT)
    os.stat(mp / "vol")
    os.stat(mp / "f")
    with tmpfs_on(mp / "vol"):
        os.chmod(lower / "vol", 0o700)
        os.chown(lower / "vol", 5, 5)
        os.utime(lower / "vol", (1, 1))
        os.setxattr(lower / "vol", "user.k", b"v")
        os.chmod(lower / "f", 0o600)  # seen: the watcher got past the changes above
        assert seen_within(lambda: os.stat(mp / "f").st_mode & 0o777 == 0o600, LIMIT) is not None
        time.sleep(0.05)
        assert kept(mp / "vol")


@pytest.fixture
def tiny_queue():
    """fs.fanotify.max_queued_events at 8 while a daemon starts (a group's
    queue size is fixed at fanotify_init); put back at once after."""
    path = "/proc/sys/fs/fanotify/max_queued_events"
    old = Path(path).read_text()
    state = {"restored": False}

    def restore():
        if not state["restored"]:
            Path(path).write_text(old)
            state["restored"] = True
    Path(path).write_text("8")
    try:
        yield restore
    finally:
        restore()


def test_queue_overflow_expires_every_name_and_detaches_nothing(lower, workdir, tiny_queue,
                                                                  counter):
    """A queue overflow: every cached name and attribute (and absent name)
    is expired, no mount stacked on the tree goes, and the long caches go
    on afterwards."""
    (lower / "vol").mkdir()
    (lower / "d").mkdir()
    (lower / "f").write_text("x")
    mp = workdir / "mnt"
    mp.mkdir()
    log = workdir / "daemon.log"
    with foreground_daemon(lower, mp, *args(ROOT_KEPT), log=log) as proc:
        tiny_queue()
        os.stat(mp / "f")
        os.stat(mp / "vol")
        assert os.listdir(mp / "d") == []  # the kernel holds d: it is watched
        assert not os.path.exists(mp / "new")  # a cached absent name
        with tmpfs_on(mp / "vol"):
            os.kill(server_pid(mp), signal.SIGSTOP)  # the daemon reads nothing: the queue overflows
            try:
                for i in range(500):
                    (lower / "d" / f"n{i}").write_text("")
                os.chmod(lower / "f", 0o600)
                (lower / "new").write_text("")
            finally:
                os.kill(server_pid(mp), signal.SIGCONT)
            assert seen_within(lambda: "overflow" in log.read_text(), 5.0) is not None
            assert seen_within(lambda: os.stat(mp / "f").st_mode & 0o777 == 0o600
                               and os.path.exists(mp / "new"), 1.0) is not None
            assert len(os.listdir(mp / "d")) == 500
            assert kept(mp / "vol")
            # and the caches are long again: changes show at once, warm stats cost nothing
            os.chmod(lower / "f", 0o640)
            assert seen_within(lambda: os.stat(mp / "f").st_mode & 0o777 == 0o640, LIMIT) is not None
            for counted in (False, True):
                if counted:
                    counter.start(os.stat(mp).st_dev)
                for _ in range(3):
                    os.stat(mp / "f")
                    os.stat(mp / "new")
                    os.listdir(mp / "d")
            counts = counter.stop()  # a directory's opens are always the daemon's to decide
            assert set(counts) <= {"FUSE_OPENDIR", "FUSE_RELEASEDIR"}, counts


def test_shrinker_pressure_keeps_mounts_stacked_on_the_tree(lower, workdir):
    """A daemon without file handles (no CAP_DAC_READ_SEARCH) and 400 fds
    walks 1,500 files twice: the shrinker makes the kernel forget old nodes
    without dropping a name that has a mount on it, and the fds stay
    within the limit."""
    (lower / "vol").mkdir()
    make_tree(lower, 15, 100)
    mnt = workdir / "mnt"
    mnt.mkdir()
    with foreground_daemon(lower, mnt, *args(STD),
                           prefix=["setpriv", "--bounding-set=-dac_read_search", "--"],
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))), \
            tmpfs_on(mnt / "vol"):
        most = 0
        for _ in range(2):
            assert walk(mnt) == 1 + 1 + 1 + 15 * 101  # the root, vol, its data, the tree
            most = max(most, len(os.listdir(f"/proc/{server_pid(mnt)}/fd")))
        assert most <= 400
        assert kept(mnt / "vol")


# ---- what is watched: only what the kernel holds -----------------------------------

def test_an_unrelated_writer_on_the_same_filesystem_costs_the_daemon_nothing(lower, workdir,
                                                                             mounter):
    make_tree(lower, 10, 20)
    mp = mounter(lower, uidmap=ROOT_KEPT)
    walk(mp)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    assert os.stat(elsewhere).st_dev == os.stat(lower).st_dev
    pid = server_pid(mp)
    before = cpu_seconds(pid)
    for i in range(20000):
        p = elsewhere / f"x{i}"
        p.write_bytes(b"")
        p.unlink()
    time.sleep(0.3)  # whatever the daemon was sent, it has read by now
    spent = cpu_seconds(pid) - before
    assert spent <= 0.05, f"the daemon spent {spent:.2f} s of CPU on another directory's writes"


def test_marks_follow_what_the_kernel_holds(lower, mounter):
    """One mark per directory the kernel has looked up (and the root), none
    for plain files; gone when the kernel forgets the nodes."""
    make_tree(lower, 20, 50)
    mp = mounter(lower, uidmap=ROOT_KEPT)
    pid = server_pid(mp)
    assert fanotify_marks(pid) == 1  # the root
    walk(mp)
    assert fanotify_marks(pid) == 1 + 20
    shutil.rmtree(mp / "d000")  # through the mount: the kernel forgets those nodes
    assert seen_within(lambda: fanotify_marks(pid) == 1 + 19, 1.0) is not None


def test_changes_through_names_no_watched_directory_holds_show(lower, workdir, mounter):
    """A directory's mark sees changes made through that directory only: a
    file with a second name outside the lower has a mark of its own, and so
    does one moved out of the lower while the kernel holds it (open)."""
    (lower / "linked").write_text("x")
    (lower / "moving").write_text("x")
    outside = workdir / "outside"
    outside.mkdir()
    os.link(lower / "linked", outside / "link")
    mp = mounter(lower, uidmap=ROOT_KEPT)
    os.stat(mp / "linked")
    with open(mp / "moving") as held:
        os.rename(lower / "moving", outside / "moved")
        assert seen_within(lambda: not os.path.exists(mp / "moving"), LIMIT) is not None
        time.sleep(0.05)
        os.chmod(outside / "moved", 0o600)
        assert seen_within(lambda: os.fstat(held.fileno()).st_mode & 0o777 == 0o600,
                           LIMIT) is not None
    os.chmod(outside / "link", 0o640)
    assert seen_within(lambda: os.stat(mp / "linked").st_mode & 0o777 == 0o640, LIMIT) is not None


class _Session:
    """What the watcher tells the kernel, recorded (no FUSE mount)."""
    expire_only = True
    can_prune = True

    def __init__(self):
        self.sent = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.sent.append((name, args, kwargs)) or 0


def test_where_marks_run_out_the_nodes_beyond_get_short_lifetimes(lower, monkeypatch, caplog):
    """fs.fanotify.max_user_marks reached (ENOSPC), here after the root and
    two directories: a directory beyond keeps its names and listing short
    (its parent's mark still reports its own attributes), and it says so
    once."""
    from shiftfs import linux, watch
    from shiftfs.idmap import build_idmap
    from shiftfs.cache import Lifetimes, Plan
    from shiftfs.filesystem import Context, Granted
    from shiftfs.ops import Operations
    CTX = Context(0, 0, os.getpid())
    for i in range(4):
        (lower / f"d{i}").mkdir()
    # timeouts 1 s as given; watched names and attributes an hour
    ops = Operations(str(lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []),
                     Plan("auto", Lifetimes(1, 1, 1)))
    watcher = None
    real, added = linux.fanotify_mark, [0]

    def limited(fd, flags, mask, path, dir_fd=linux.AT_FDCWD):
        if flags & linux.FAN_MARK_ADD:
            added[0] += 1
            if added[0] > 3:
                raise OSError(28, "No space left on device")
        return real(fd, flags, mask, path, dir_fd)
    monkeypatch.setattr(linux, "fanotify_mark", limited)
    try:
        watcher = watch.Watcher(ops.table)
        watcher.session = _Session()
        ops.init(Granted(45, False, False, True, 1 << 20, True))  # EXPIRE_ONLY granted
        with caplog.at_level("WARNING", logger="shiftfs"):
            entries = [ops.lookup(CTX, 1, f"d{i}".encode()) for i in range(4)]
        ops.table.request_done()
        assert [e.entry_timeout for e in entries] == [3600] * 4  # names in the root: watched
        assert [e.attr_timeout for e in entries] == [3600] * 4  # the root's mark sees them change
        nodes = [ops.table.peek(e.node_id) for e in entries]
        assert [n.marked for n in nodes] == [True, True, False, False]
        absent = [ops.lookup(CTX, e.node_id, b"nothing").entry_timeout for e in entries]
        assert absent == [3600, 3600, 1, 1]  # names inside: only where marked
        cached = []
        for e in entries:
            opened = ops.opendir(CTX, e.node_id)
            fh, cache = opened.fh, opened.keep_cache
            ops.releasedir(e.node_id, fh)
            cached.append(cache)
        assert cached == [True, True, False, False]
        assert sum("marks ran out" in r.getMessage() for r in caplog.records) == 1
    finally:
        ops.table.request_done()
        if watcher is not None:
            os.close(watcher._fd)
        ops.destroy()


def _changes_show_within_the_limit(lower: Path, view: Path) -> dict[str, float]:
    """chmod, create, removal and rename made on the lower: the delay until
    each shows through ``view`` (the mount), all after the names were cached."""
    (lower / "d").mkdir()
    (lower / "d" / "f").write_text("x")
    (lower / "d" / "gone").write_text("x")
    (lower / "d" / "old").write_text("x")
    for name in ("f", "gone", "old"):
        os.stat(view / "d" / name)
    for name in ("new", "renamed"):
        assert not os.path.exists(view / "d" / name)  # cached as absent
    assert sorted(os.listdir(view / "d")) == ["f", "gone", "old"]
    delays = {}
    os.chmod(lower / "d" / "f", 0o600)
    delays["chmod"] = seen_within(lambda: os.stat(view / "d" / "f").st_mode & 0o777 == 0o600, 1.5)
    (lower / "d" / "new").write_text("n")
    delays["create"] = seen_within(lambda: os.path.exists(view / "d" / "new"), 1.5)
    os.unlink(lower / "d" / "gone")
    delays["removal"] = seen_within(lambda: not os.path.exists(view / "d" / "gone"), 1.5)
    os.rename(lower / "d" / "old", lower / "d" / "renamed")
    delays["rename"] = seen_within(lambda: os.path.exists(view / "d" / "renamed")
                                   and not os.path.exists(view / "d" / "old"), 1.5)
    delays["listing"] = seen_within(lambda: sorted(os.listdir(view / "d")) ==
                                    ["f", "new", "renamed"], 1.5)
    return delays


def test_lower_changes_show_within_a_tenth_of_a_second(lower, mounter):
    mp = mounter(lower, uidmap=ROOT_KEPT)
    delays = _changes_show_within_the_limit(lower, mp)
    assert all(d is not None and d <= LIMIT for d in delays.values()), delays


def _warm_walk(counter, view: Path):
    """Requests by opcode of a warm find -ls (after one cold one), and the
    number of paths it walked."""
    walk(view)  # cold
    counter.start(os.stat(view).st_dev)
    paths = walk(view)
    return counter.stop(), paths


# Directories are opened and released without the daemon (no-opendir
# mode, negotiate.py), so a warm walk sends nothing but, the first time
# after a cold one, a GETATTR per directory (reading a listing from the
# daemon drops the directory's atime). bench/'s tree: 40-entry directories.
WARM_TREE = (50, 40)


def test_a_warm_walk_is_served_by_the_kernel(lower, mounter, counter):
    make_tree(lower, *WARM_TREE)
    mp = mounter(lower, uidmap=ROOT_KEPT)
    counts, paths = _warm_walk(counter, mp)
    # names and listings from the kernel's caches: at most each directory's
    # attributes again (its atime), and what a GETATTR brings (its ACL)
    assert not {"FUSE_LOOKUP", "FUSE_READDIR", "FUSE_READDIRPLUS", "FUSE_OPENDIR",
                "FUSE_RELEASEDIR"} & set(counts), counts
    counter.start(os.stat(mp).st_dev)
    assert walk(mp) == paths
    counts = counter.stop()
    assert sum(n for op, n in counts.items() if op.startswith("FUSE_")) / paths <= 0.02, counts
    assert not {"FUSE_LOOKUP", "FUSE_READDIR", "FUSE_READDIRPLUS", "FUSE_OPENDIR"} & set(counts)


def test_directories_are_listed_without_an_open(lower, mounter, counter):
    """No OPENDIR or RELEASEDIR reaches the daemon, cold or warm; a
    directory of 5,000 names lists whole, twice at once; fsync and the
    flags ioctl of an open directory work; a name made behind the mount
    shows in the kept listing, and so does one made through it."""
    big = lower / "big"
    big.mkdir()
    names = {f"n{i:04d}-{'x' * (i % 60)}" for i in range(5000)}
    for n in names:
        (big / n).write_text("")
    mp = mounter(lower, uidmap=ROOT_KEPT)
    os.listdir(mp)  # the first OPENDIR is answered ENOSYS: the mode starts
    counter.start(os.stat(mp).st_dev)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        listings = list(pool.map(lambda _: os.listdir(mp / "big"), range(2)))
    assert [sorted(x) for x in listings] == [sorted(names)] * 2
    fd = os.open(mp / "big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        assert fcntl.ioctl(fd, 0x80086601, bytes(8))  # FS_IOC_GETFLAGS
    finally:
        os.close(fd)
    (lower / "big" / "behind").write_text("")
    assert seen_within(lambda: "behind" in os.listdir(mp / "big"), LIMIT) is not None
    (mp / "big" / "through").write_text("")
    assert {"behind", "through"} <= set(os.listdir(mp / "big"))
    counts = counter.stop()
    assert not {"FUSE_OPENDIR", "FUSE_RELEASEDIR"} & set(counts), counts
    assert counts["FUSE_FSYNCDIR"] == 1 and counts["FUSE_IOCTL"] >= 1, counts


@pytest.fixture
def rootless_lower(lower):
    os.chown(lower, namespace.RUSER, namespace.RUSER)
    return lower


def test_rootless_lower_changes_show_within_a_tenth_of_a_second(rootless_lower, workdir):
    with namespace.mount_as_user(rootless_lower, workdir) as (_pid, view, log):
        delays = _changes_show_within_the_limit(rootless_lower, view)
        assert all(d is not None and d <= LIMIT for d in delays.values()), (delays, log.read_text())


def test_rootless_a_warm_walk_is_served_by_the_kernel(rootless_lower, workdir, counter):
    """As root, but for the FUSE root's ACL: a mount made by fusermount3
    shows the FUSE root, whose inode the kernel made before INIT turned
    POSIX ACLs on, so it never caches its ACL, and a path walk from the
    mount root asks for it (docs/caching.md)."""
    make_tree(rootless_lower, *WARM_TREE)
    with namespace.mount_as_user(rootless_lower, workdir) as (_pid, view, _log):
        first, paths = _warm_walk(counter, view)
        counter.start(os.stat(view).st_dev)
        assert walk(view) == paths
        counts = counter.stop()
    for c in (first, counts):
        acl = c.pop("FUSE_GETXATTR", 0)
        assert acl == c.pop("xattr:system.posix_acl_access", 0)  # the root's ACL, nothing else
        assert not {"FUSE_LOOKUP", "FUSE_READDIR", "FUSE_READDIRPLUS", "FUSE_OPENDIR"} & set(c)
    assert first.get("FUSE_GETATTR", 0) <= WARM_TREE[0] + 1, first  # each directory's atime
    assert sum(n for op, n in counts.items() if op.startswith("FUSE_")) / paths <= 0.02, counts


def test_a_containers_proc_survives_a_flood_on_the_same_filesystem(lower, workdir, tiny_queue):
    """A container-like process: /proc mounted on the tree's proc directory
    (as a runtime mounts it), then a flood of creates and removes on the
    lower's filesystem, inside a directory the kernel holds and beside the
    lower, with a queue of 8 events (on ext4 it overflows at once): /proc is
    still mounted and still the procfs, and the changes show."""
    (lower / "proc").mkdir()
    (lower / "tmp").mkdir()
    beside = workdir / "beside"
    beside.mkdir()
    mp = workdir / "mnt"
    mp.mkdir()
    log = workdir / "daemon.log"
    with foreground_daemon(lower, mp, *args(STD), log=log):
        tiny_queue()
        assert os.listdir(mp / "tmp") == []  # the kernel holds tmp: it is watched
        subprocess.run(["mount", "-t", "proc", "proc", str(mp / "proc")], check=True)
        try:
            for i in range(3000):
                for d in (lower / "tmp", beside):
                    (d / f"f{i}").write_text("")
                    if i % 2:
                        (d / f"f{i}").unlink()
            assert seen_within(lambda: len(os.listdir(mp / "tmp")) == 1500, 5.0) is not None
            assert str(mp / "proc") in namespace.mount_points(os.getpid())
            assert (mp / "proc" / "self" / "status").read_text().startswith("Name:")
            # (on ext4 the flood overflows the 8-event queue; on CI's tmpfs /tmp it need not:
            # test_queue_overflow_expires_every_name_and_detaches_nothing forces one)
        finally:
            subprocess.run(["umount", "-l", str(mp / "proc")], capture_output=True)


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_events_find_their_nodes_with_or_without_an_index(lower, ext4_lower, kind):
    """On ext4 (FILEID_INO32_GEN handles: the inode's number and
    generation) the watcher finds an event's node by number, with no index
    entry a node; on tmpfs (other handles) by its index. Either way a fid
    with the right number and another generation (the inode freed, its
    number given to a new file) never finds the node: on ext4 it names the
    handle id it spells, which the table keeps nothing for."""
    from shiftfs import watch
    from shiftfs.idmap import build_idmap
    from shiftfs.cache import Lifetimes, Plan
    from shiftfs.filesystem import Context
    from shiftfs.node import handle_id
    from shiftfs.ops import Operations

    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "shiftfs-fids", str(lower)], check=True)
    else:
        lower = ext4_lower
    ops = watcher = None
    try:
        assert subprocess.run(["stat", "-f", "-c", "%T", str(lower)], capture_output=True,
                              text=True).stdout.strip() == {"ext4": "ext2/ext3", "tmpfs": "tmpfs"}[kind]
        for i in range(50):
            (lower / f"f{i}").write_text("")
        ops = Operations(str(lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []),
                         Plan("auto", Lifetimes(1, 1, 1)))
        watcher = watch.Watcher(ops.table)
        ctx = Context(0, 0, 1)
        nodes = [ops.table.peek(ops.lookup(ctx, 1, f"f{i}".encode()).node_id) for i in range(50)]
        ops.table.request_done()
        fsid = watcher._fsids[nodes[0].dev]
        assert all(watcher._find(fsid + n.fid) is n for n in nodes)
        indexed = sum(len(d) for d in watcher._by_fid.values())
        assert indexed == (0 if kind == "ext4" else 51), indexed  # the root too, on tmpfs
        for n in nodes:
            other = bytearray(n.fid)
            other[12] ^= 1  # generation (ext4), or a byte of tmpfs's own handle
            found = watcher._find(fsid + bytes(other))
            if kind == "ext4":
                assert found is not n and found.node_id == handle_id(bytes(other)) != n.node_id
                assert ops.table.peek(found.node_id) is None
            else:
                assert found is None
    finally:
        if watcher is not None:
            os.close(watcher._fd)
        if ops is not None:
            ops.table.request_done()
            ops.destroy()
        if kind == "tmpfs":
            subprocess.run(["umount", str(lower)], check=True)


def test_names_of_files_known_by_their_ids_are_remembered_until_they_go(ext4_lower):
    """A file known by its handle id has no node to record its name, so
    the watcher remembers it for an overflow to expire; a name removed or
    renamed through the mount is forgotten (a directory churning through
    temporary files would otherwise fill the store)."""
    from shiftfs import watch
    from shiftfs.idmap import build_idmap
    from shiftfs.filesystem import Context, Granted
    from shiftfs.node import HANDLE_IDS
    from shiftfs.ops import Operations

    for name in ("a", "b", "c"):
        (ext4_lower / name).write_text(name)
    ops = Operations(str(ext4_lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []))
    watcher = watch.Watcher(ops.table)
    try:
        ops.init(Granted(45, False, False, True, 1 << 20))
        ctx = Context(100000, 100000, os.getpid())  # upper root: lower 0, the files' owner
        ids = [ops.lookup(ctx, 1, name).node_id for name in (b"a", b"b", b"c")]
        ops.request_done()
        assert all(i >= HANDLE_IDS for i in ids)
        assert watcher._names[1] == dict(zip((b"a", b"b", b"c"), ids))  # names, with their ids
        ops.unlink(ctx, 1, b"a")
        ops.rename(ctx, 1, b"b", 1, b"b2", 0)
        ops.request_done()
        assert watcher._names[1] == {b"c": ids[2]} and watcher._name_count == 1
    finally:
        os.close(watcher._fd)
        ops.table.close()


def _stopped(pid: int) -> None:
    """SIGSTOP the server and wait until each of its threads is stopped."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped():
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("T", "t"):
                return False
        return True
    assert seen_within(all_stopped, 5.0) is not None, "the server did not stop"


def _overflow(mnt, log, flood: Path, change) -> None:
    """``change()`` behind the mount while the server's queue overflows."""
    pid = server_pid(mnt)
    _stopped(pid)
    try:
        for i in range(100):
            (flood / f"flood{i}").write_text("")
        change()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert seen_within(lambda: "overflow" in log.read_text(), 5.0) is not None


def test_an_overflow_expires_a_file_held_by_its_id_moved_where_nothing_is_held(
        ext4_lower, workdir, tiny_queue):
    """The kernel holds a/f by its handle id (a listing, then an O_PATH fd:
    no node kept); during an overflow the lower moves it into c/, which
    the mount never looked up, and chmods it: the change shows on the fd
    (the id was remembered with the name). Found by the red team: before,
    only the held directories' listings were searched."""
    lower = ext4_lower
    (lower / "a").mkdir()
    (lower / "c").mkdir()
    (lower / "a" / "f").write_text("x")
    os.chmod(lower / "a" / "f", 0o644)
    mnt, log = workdir / "mnt", workdir / "log"
    mnt.mkdir()
    with foreground_daemon(lower, mnt, *args(STD), log=log):
        tiny_queue()
        assert os.listdir(mnt / "a") == ["f"]
        fd = os.open(mnt / "a" / "f", os.O_PATH)
        try:
            assert os.fstat(fd).st_mode & 0o777 == 0o644

            def change():
                os.rename(lower / "a" / "f", lower / "c" / "f")
                os.chmod(lower / "c" / "f", 0o600)
            _overflow(mnt, log, lower / "a", change)
            assert seen_within(lambda: os.fstat(fd).st_mode & 0o777 == 0o600, 1.0) is not None
        finally:
            os.close(fd)


def test_an_overflow_expires_the_files_of_a_directory_that_gave_its_fd_back(
        ext4_lower, workdir, tiny_queue):
    """d/ gave its fd back to the shrinker; d/f, held by its id, is chmodded
    during an overflow: the change shows (d is listed by its handle)."""
    lower = ext4_lower
    (lower / "d").mkdir()
    (lower / "d" / "f").write_text("x")
    os.chmod(lower / "d" / "f", 0o644)
    (lower / "many").mkdir()
    for i in range(1500):
        (lower / "many" / f"m{i}").touch()
    mnt, log = workdir / "mnt", workdir / "log"
    mnt.mkdir()
    with foreground_daemon(lower, mnt, *args(STD), log=log, fd_limit=2000):
        tiny_queue()
        assert os.listdir(mnt / "d") == ["f"]
        fd = os.open(mnt / "d" / "f", os.O_PATH)
        try:
            pid = server_pid(mnt)
            i = 0
            while str(lower / "d") in fd_targets(pid):  # lookups keep nodes with fds
                assert i < 1500, "the shrinker never gave d's fd back"
                for j in range(i, i + 100):
                    os.stat(mnt / "many" / f"m{j}")
                i += 100
                time.sleep(0.05)
            _overflow(mnt, log, lower / "many", lambda: os.chmod(lower / "d" / "f", 0o600))
            assert seen_within(lambda: os.fstat(fd).st_mode & 0o777 == 0o600, 1.0) is not None
        finally:
            os.close(fd)


def test_a_file_the_kernel_forgets_while_it_is_covered_keeps_no_node_or_mark(ext4_lower):
    """_cover gives a file known by its id (no node kept) a mark of its own
    when it leaves its watched directory, if the kernel holds it; the
    kernel's FORGET may come between that question and keep() (it finds
    no node then, and no other comes). The node kept for the mark must
    go again, mark and all: found by the red team, a node and a mark held
    until unmount. Here the session says the kernel holds the inode, then
    that it does not."""
    from shiftfs import watch
    from shiftfs.idmap import build_idmap
    from shiftfs.filesystem import Granted
    from shiftfs.node import HANDLE_IDS
    from shiftfs.ops import Operations

    (ext4_lower / "f").write_text("x")
    ops = Operations(str(ext4_lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []))
    watcher = watch.Watcher(ops.table)
    answers = [0, -errno.ENOENT]  # held at the first question, forgotten at the next

    class Session(_Session):
        def inval_inode(self, node_id, off=0, length=0):
            self.sent.append(("inval_inode", (node_id,), {}))
            return answers.pop(0) if answers else -errno.ENOENT
    watcher.session = Session()
    try:
        ops.init(Granted(45, False, False, True, 1 << 20, True))
        node, _st = ops.table.add_unopened(ops.table.root.fd, b"f", 1)
        assert node.node_id >= HANDLE_IDS and ops.table.peek(node.node_id) is None
        watcher._cover(node)
        assert ops.table.peek(node.node_id) is None, "a node kept that no FORGET will drop"
        assert node.key not in watcher._marked, "a mark kept that nothing will remove"
        assert [c for c, _a, _k in watcher.session.sent].count("inval_inode") == 2
    finally:
        os.close(watcher._fd)
        ops.table.close()


def test_a_linked_file_a_forget_drops_is_marked_again_if_the_kernel_holds_it(ext4_lower):
    """A file with two links has a mark of its own (its directory's sees
    changes through that name only). Known by its handle id, its count may
    have begun after the kernel's (a listing hands ids out uncounted), so a
    FORGET that follows a racing LOOKUP can take it to zero while the kernel
    holds the file: the node went with its mark, and changes through the
    other name went unreported for the attributes' whole lifetime. Found
    by the red team. Now the shrinker's thread asks the kernel (here: it
    holds it) and the file is marked again."""
    from shiftfs import watch
    from shiftfs.idmap import build_idmap
    from shiftfs.filesystem import Context, Granted
    from shiftfs.node import HANDLE_IDS
    from shiftfs.ops import Operations

    (ext4_lower / "f").write_text("x")
    os.link(ext4_lower / "f", ext4_lower / "g")
    ops = Operations(str(ext4_lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []))
    watcher = watch.Watcher(ops.table)
    watcher.session = _Session()  # inval_inode answers 0: the kernel holds the inode
    try:
        ops.init(Granted(45, False, False, True, 1 << 20, True))
        ctx = Context(100000, 100000, os.getpid())
        node_id = ops.lookup(ctx, 1, b"f").node_id
        ops.request_done()
        node = ops.table.peek(node_id)
        assert node_id >= HANDLE_IDS and node.marked and node.key in watcher._marked
        ops.table.shrink_wanted.clear()
        ops.forget([(node_id, 2)])  # the kernel's count: one uncounted listing, this lookup
        assert ops.table.peek(node_id) is None and node.key not in watcher._marked
        assert ops.table.shrink_wanted.is_set()  # the shrinker's thread is woken to ask
        shrinker = watch.Shrinker(ops.table, watcher.session)
        shrinker.ask_held()
        again = ops.table.peek(node_id)
        assert again is not None and again.marked and again.key in watcher._marked
        # dropped again, and the kernel forgets it between the two questions
        # (keep() marks a linked file itself): nothing stays kept or marked
        answers = [0, -errno.ENOENT]
        watcher.session.inval_inode = lambda *_a, **_k: answers.pop(0) if answers else -errno.ENOENT
        ops.forget([(node_id, 1)])
        shrinker.ask_held()
        assert ops.table.peek(node_id) is None and again.key not in watcher._marked
    finally:
        os.close(watcher._fd)
        ops.table.close()


def test_an_overflow_expires_the_names_renames_through_the_mount_gave(ext4_lower):
    """A rename through the mount moves the kernel's dentry to the new
    name, which no reply handed out: the node's record (a file held by a
    lookup, a directory) and, for a file known only by its id (a
    listing's), a remembered name must follow, or an overflow leaves the
    new name cached for its whole lifetime (a file deleted behind the
    mount meanwhile stays visible there)."""
    from shiftfs import watch
    from shiftfs.idmap import build_idmap
    from shiftfs.filesystem import Context, Granted
    from shiftfs.ops import Operations

    for name in ("kept", "listed"):
        (ext4_lower / name).write_text(name)
    (ext4_lower / "dir").mkdir()
    ops = Operations(str(ext4_lower), build_idmap([shiftfs.Extent(0, 100000, 65536)], []))
    watcher = watch.Watcher(ops.table)
    watcher.session = _Session()
    try:
        ops.init(Granted(45, False, False, True, 1 << 20, True))
        ctx = Context(100000, 100000, os.getpid())  # upper root: lower 0, the files' owner
        kept = ops.lookup(ctx, 1, b"kept").node_id
        directory = ops.lookup(ctx, 1, b"dir").node_id
        listed, _st = ops.table.add_unopened(ops.table.root.fd, b"listed", 1)
        assert ops.table.peek(listed.node_id) is None  # known by its id alone
        ops.request_done()
        for old, new in ((b"kept", b"kept2"), (b"dir", b"dir2"), (b"listed", b"listed2")):
            ops.rename(ctx, 1, old, 1, new, 0)
            ops.request_done()
        watcher.expire_all()
        expired = {args[:2] for what, args, _kw in watcher.session.sent if what == "inval_entry"}
        assert {(1, b"kept2"), (1, b"dir2"), (1, b"listed2")} <= expired
        inodes = {args[0] for what, args, _kw in watcher.session.sent if what == "inval_inode"}
        assert {kept, directory, listed.node_id} <= inodes
    finally:
        os.close(watcher._fd)
        ops.table.close()


def test_absent_names_kept_for_an_overflow_are_fewer_than_files_names(lower, monkeypatch):
    """A stat of a missing name costs a caller nothing: such names are kept
    to ABSENT_KEPT (then the short lifetime), while names of files known
    by their ids go on to NAMES_KEPT; forgetting one frees its place."""
    from shiftfs import watch
    from shiftfs.inodes import InodeTable

    monkeypatch.setattr(watch, "ABSENT_KEPT", 3)
    monkeypatch.setattr(watch, "NAMES_KEPT", 5)
    table = InodeTable(os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    watcher = watch.Watcher(table)
    try:
        root = table.root
        assert all(watcher.remember_name(root, b"absent%d" % i) for i in range(3))
        assert not watcher.remember_name(root, b"absent3")
        assert watcher.remember_name(root, b"absent0")  # kept already
        assert watcher.remember_name(root, b"file0", 1 << 63 | 5)
        assert watcher.remember_name(root, b"file1", 1 << 63 | 6)
        assert not watcher.remember_name(root, b"file2", 1 << 63 | 7)  # NAMES_KEPT reached
        watcher.forget_name(root.node_id, b"absent1")
        assert watcher.remember_name(root, b"absent3")
        assert (watcher._name_count, watcher._absent_count) == (5, 3)
    finally:
        os.close(watcher._fd)
        table.close()


def test_files_opened_by_their_ids_keep_the_long_attribute_lifetime(ext4_lower, mounter, counter):
    """Files a walk named and a reader then opened and closed (each kept
    by its id only for its requests, so with no parent known): a warm
    stat of each, after the short lifetime, is still the kernel's. Before
    the fix every such GETATTR gave the short lifetime: a warm stat of
    every path sent a GETATTR each (bench.run, 22b9f79)."""
    (ext4_lower / "d").mkdir()
    for i in range(20):
        (ext4_lower / "d" / f"f{i}").write_text("x")
    mp = mounter(ext4_lower, uidmap=ROOT_KEPT)
    names = sorted(os.listdir(mp / "d"))
    for name in names:
        with open(mp / "d" / name) as f:
            assert f.read() == "x"
            os.fstat(f.fileno())  # a GETATTR with the fh: the node kept while open
    time.sleep(1.5)  # past the short lifetime (1 s)
    counter.start(os.stat(mp).st_dev)
    for name in names:
        os.stat(mp / "d" / name)
    counts = counter.stop()
    assert not {"FUSE_GETATTR", "FUSE_LOOKUP"} & set(counts), counts

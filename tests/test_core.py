"""The v2 core: one node per lower inode, every request from a held fd.

Ops-level tests drive shiftfs.ops.Operations without a kernel; mounted
tests show what that gives a caller (hard links, unlinked open files, deep
paths) and that the attacks of a hostile neighbour sharing the lower fail:
a device node or FIFO swapped in under a cached name, a create on a stale
negative entry.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from shiftfs.idmap import Extent, build_idmap
from shiftfs.filesystem import Context
from shiftfs.node import HANDLE_IDS
from shiftfs.ops import Operations

CTX = Context(0, 0, os.getpid())  # a request by root, as the handlers take it

from tests.callers import call_as
from tests.daemon import foreground_daemon, server_pid
from tests.tables import ROOT_KEPT, STD, args, upper_of

USER = upper_of(1000, ROOT_KEPT)  # 101000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def ops_tree():
    base = Path(tempfile.mkdtemp(prefix="shiftfs-core-", dir="/tmp"))
    lower = base / "lower"
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "f").write_text("inside")
    os.link(lower / "a" / "b" / "f", lower / "a" / "hard")
    (base / "outside").mkdir()
    (base / "outside" / "f").write_text("outside")
    os.symlink(base / "outside", lower / "abs")
    os.symlink("../../outside", lower / "a" / "rel")
    ops = Operations(str(lower), build_idmap([Extent(0, 100000, 65536)], []))
    try:
        yield ops
    finally:
        ops.destroy()
        subprocess.run(["rm", "-rf", str(base)], check=True)


def _walk(ops, path: bytes):
    node = 1
    for part in path.split(b"/"):
        node = ops.lookup(CTX, node, part).node_id
    return node


def test_names_resolve_to_nodes_with_upper_ids(ops_tree):
    node = _walk(ops_tree, b"a/b/f")
    st, uid, _gid, _timeout = ops_tree.getattr(CTX, node, None)
    assert st.st_size == len("inside") and uid == 100000 + os.getuid()


@pytest.mark.parametrize("path", [b"abs/f", b"a/rel/f"])
def test_a_symlink_used_as_a_directory_is_enotdir(ops_tree, path):
    with pytest.raises(OSError) as exc:
        _walk(ops_tree, path)
    assert exc.value.errno == errno.ENOTDIR


def test_the_last_component_is_not_followed(ops_tree):
    st = ops_tree.getattr(CTX, _walk(ops_tree, b"abs"), None)[0]
    assert os.path.stat.S_ISLNK(st.st_mode)
    assert ops_tree.readlink(CTX, _walk(ops_tree, b"abs")).endswith(b"/outside")


@pytest.mark.parametrize("name", [b".", b"..", b"x/y"])
def test_names_that_are_not_names_are_refused(ops_tree, name):
    with pytest.raises(OSError) as exc:
        ops_tree.lookup(CTX, 1, name)
    assert exc.value.errno == errno.EINVAL


def test_hard_links_are_one_node_and_forget_releases_it(ops_tree):
    before = _open_fds()
    a = _walk(ops_tree, b"a/b/f")
    b = _walk(ops_tree, b"a/hard")
    assert a == b
    node = ops_tree.table.get(a)
    assert node.nlookup == 2
    ops_tree.request_done()  # as each request ends: the nodes it named are held no more
    nodes = len(ops_tree.table)
    ops_tree.forget([(a, 1)])
    assert len(ops_tree.table) == nodes  # one lookup left
    ops_tree.forget([(a, 1)])
    assert len(ops_tree.table) == nodes - 1
    # a/ and a/b/ are still held (two fds); the file's fd is gone
    assert _open_fds() == before + 2
    if a >= HANDLE_IDS:  # its id names the inode still: a request reopens it, and holds it no longer
        assert ops_tree.getattr(CTX, a, None)[0].st_ino == os.stat(f"/proc/self/fd/{ops_tree.table.root.fd}/a/hard").st_ino
        ops_tree.request_done()
        # parked (inodes._park): kept, fd and all, for the next request on it
        assert len(ops_tree.table) == nodes and _open_fds() == before + 3
        ops_tree.forget([(a, 1)])  # the kernel's FORGET of the id: gone at once
        assert len(ops_tree.table) == nodes - 1 and _open_fds() == before + 2
    else:
        with pytest.raises(OSError) as exc:
            ops_tree.getattr(CTX, a, None)
        assert exc.value.errno == errno.ESTALE


# ---- mounted -------------------------------------------------------------------

def test_hard_link_names_share_attributes_at_once(lower, mounter):
    """chmod through one name shows on the other at once, with long
    timeouts (one node, not one per name)."""
    (lower / "a").write_text("x")
    mnt = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "timeout=60"])
    os.stat(mnt / "a")
    os.link(mnt / "a", mnt / "b")
    assert os.stat(mnt / "a").st_nlink == 2
    os.chmod(mnt / "b", 0o604)
    assert os.stat(mnt / "a").st_mode & 0o777 == 0o604
    os.link(mnt / "b", mnt / "c")
    assert os.stat(mnt / "a").st_nlink == 3
    os.chown(mnt / "c", 100008, 100009)
    st = os.stat(mnt / "a")
    assert (st.st_uid, st.st_gid) == (100008, 100009)
    assert os.stat(mnt / "a").st_ino == os.stat(mnt / "c").st_ino == os.stat(lower / "a").st_ino


def test_fstat_of_an_open_unlinked_file(lower, mounter):
    (lower / "f").write_text("data")
    mnt = mounter(lower)
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        os.unlink(mnt / "f")
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 4
        os.pwrite(fd, b"more", 4)
        assert os.pread(fd, 8, 0) == b"datamore"
    finally:
        os.close(fd)
    assert not (lower / "f").exists()


def test_a_path_longer_than_path_max_through_a_deep_cwd(lower, mounter):
    """No path is built from the root: a 5,000-byte relative path from a
    deep cwd works, as on a local filesystem."""
    os.chown(lower, 1000, 1000)
    mnt = mounter(lower)
    part = "d" * 200

    def deep():
        os.chdir(mnt)
        for _ in range(26):  # a cwd 5,200 bytes below the mount
            os.mkdir(part)
            os.chdir(part)
        with open("f", "w") as f:
            f.write("deep")
        os.rename("f", "g")
        return os.stat("g").st_uid, len(os.getcwd()) - len(str(mnt))

    uid, depth = call_as(deep, uid=USER, gid=USER)
    assert uid == USER and depth > 5000
    fd = os.open(lower, os.O_RDONLY)
    try:
        for _ in range(26):
            nxt = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        assert os.stat("g", dir_fd=fd).st_uid == 1000
    finally:
        os.close(fd)


def _cache_regular_file(path: Path) -> None:
    with open(path, "rb") as f:
        assert f.read() == b"original\n"
    os.stat(path)


@pytest.mark.parametrize("cache", ["timeout", "watch"])
def test_device_node_swapped_in_under_a_cached_name_is_never_opened(lower, mounter, cache):
    """Issue 12.1: container B (another mount of the same lower) renames a
    device node over a name mount A has cached as a regular file. Without a
    watcher, A's open reaches the daemon, which reopens the inode A looked
    up (the original file), never the device; with one, A's kernel learns
    of the swap, sees a device node, and nodev refuses it (EACCES)."""
    (lower / "tmp").mkdir(mode=0o1777)
    (lower / "tmp" / "target").write_text("original\n")
    os.chmod(lower / "tmp" / "target", 0o666)
    os.mknod(lower / "zero", 0o666 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    mnt_a = mounter(lower, uidmap=ROOT_KEPT, options=["-o", f"cache={cache},timeout=60"])
    mnt_b = mounter(lower, uidmap=[Extent(0, 0, 1), Extent(1, 200001, 65535)])
    _cache_regular_file(mnt_a / "tmp" / "target")
    os.link(mnt_b / "zero", mnt_b / "tmp" / "dev")
    os.rename(mnt_b / "tmp" / "dev", mnt_b / "tmp" / "target")
    assert os.path.stat.S_ISCHR(os.lstat(lower / "tmp" / "target").st_mode)
    time.sleep(0.2)  # the watcher's invalidation, where there is one
    try:
        with open(mnt_a / "tmp" / "target", "rb") as f:
            data = f.read(16)
    except OSError as e:
        data = e.errno
    expected = (b"original\n", errno.ENOENT, errno.ESTALE) if cache == "timeout" else (errno.EACCES,)
    assert data in expected, data  # never zeros


@pytest.mark.parametrize("cache", ["timeout", "watch"])
def test_fifo_swapped_in_under_cached_names_does_not_hang_the_mount(lower, mounter, cache):
    """Issue 12.2: FIFOs renamed over cached regular files, then `cat` of
    each through the mount. No daemon worker ever blocks (the daemon never
    opens a FIFO): a caller may wait on a FIFO the kernel now knows as one,
    as on a local filesystem, but the mount keeps answering everyone else."""
    (lower / "tmp").mkdir(mode=0o1777)
    (lower / "other").mkdir()
    for i in range(12):
        (lower / "tmp" / f"t{i}").write_text("original\n")
    mnt = mounter(lower, uidmap=ROOT_KEPT, options=["-o", f"cache={cache},timeout=60"])
    for i in range(12):
        _cache_regular_file(mnt / "tmp" / f"t{i}")
        os.mkfifo(lower / "tmp" / f"fifo{i}")
        os.rename(lower / "tmp" / f"fifo{i}", lower / "tmp" / f"t{i}")
    time.sleep(0.2)
    cats = [subprocess.Popen(["cat", str(mnt / "tmp" / f"t{i}")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for i in range(12)]
    try:
        time.sleep(0.5)
        answer = subprocess.run([sys.executable, "-c", "import os, sys; print(os.listdir(sys.argv[1]))",
                                 str(mnt / "other")], capture_output=True, text=True, timeout=10)
        assert answer.returncode == 0 and answer.stdout.strip() == "[]"
        assert sorted(os.listdir(mnt)) == ["other", "tmp"]
    finally:
        for c in cats:
            c.kill()
            c.wait()


def test_create_on_a_stale_negative_entry_checks_permission(lower, mounter):
    """Issue 12.3: a user's mount caches 'victim' as absent; root creates it
    (0600) through a second mount; the user's O_CREAT open must be what an
    open of the existing file gives (EACCES), never the daemon's rights."""
    (lower / "tmp").mkdir(mode=0o1777)
    mnt_a = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "negative_timeout=60"])
    mnt_b = mounter(lower, uidmap=ROOT_KEPT)
    victim = mnt_a / "tmp" / "victim"
    assert call_as(lambda: os.path.exists(victim), uid=USER, gid=USER) is False
    fd = os.open(mnt_b / "tmp" / "victim", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"root's\n")
    os.close(fd)

    def append():
        try:
            fd = os.open(victim, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        except OSError as e:
            return e.errno
        os.write(fd, b"user's\n")
        os.close(fd)
        return "ok"

    assert call_as(append, uid=USER, gid=USER) == errno.EACCES
    assert (lower / "tmp" / "victim").read_bytes() == b"root's\n"

    def create_excl():
        try:
            os.close(os.open(victim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except OSError as e:
            return e.errno
        return "ok"

    assert call_as(create_excl, uid=USER, gid=USER) == errno.EEXIST


def test_a_directory_handle_holds_one_batch_whatever_the_directory_size(ops_tree):
    """Issue 12.5: a listing streams from the lower directory with the
    lower's own offsets; an open handle holds one getdents batch (32 KiB),
    never the whole listing, and resumes exactly where the kernel says."""
    big = Path(f"/proc/self/fd/{ops_tree.table.root.fd}") / "a" / "big"
    os.mkdir(big)
    names = {f"entry-{i:05d}".encode() for i in range(20000)}
    for n in names:
        os.close(os.open(big / n.decode(), os.O_CREAT | os.O_WRONLY, 0o644))
    node = _walk(ops_tree, b"a/big")
    fh = ops_tree.opendir(CTX, node).fh
    try:
        stream = ops_tree.readdir(node, fh, 0)
        seen, biggest, resume_at = [], 0, None
        while (item := stream.peek()) is not None:
            biggest = max(biggest, len(stream.batch))
            seen.append(item[0])
            if len(seen) == 7000:
                resume_at = item[3]
            stream.advance()
        assert set(seen) == names | {b".", b".."} and len(seen) == len(names) + 2
        assert biggest < 1500  # one 32 KiB batch of ~30-byte records, not 20,002 entries
        # the kernel comes back with the offset of the 7,000th entry: the rest follows
        stream = ops_tree.readdir(node, fh, resume_at)
        rest = []
        while (item := stream.peek()) is not None:
            rest.append(item[0])
            stream.advance()
        assert rest == seen[7000:]
    finally:
        ops_tree.releasedir(node, fh)


def test_nodes_no_request_names_give_their_fds_back_and_reopen_as_the_same_inode(ops_tree):
    """The fd budget: nodes that no running request names give their fd back
    and keep a file handle, however recently they were named; a node a
    running request holds keeps its fd; the next request reopens exactly
    that inode (and a file whose name was swapped meanwhile is still the
    one the kernel knows)."""
    table = ops_tree.table
    assert table.handles  # root with CAP_DAC_READ_SEARCH on tmpfs/ext4
    table.handle_ids = False  # counted ids, as where a handle cannot be one (a handle id is let go)
    lower = Path(f"/proc/self/fd/{table.root.fd}")
    for i in range(50):
        (lower / "a" / f"n{i}").write_text(str(i))
    a = _walk(ops_tree, b"a")
    ids = [ops_tree.lookup(CTX, a, f"n{i}".encode()).node_id for i in range(50)]
    table.request_done()  # the lookups' requests have ended
    held = table.get(ids[-1])  # a request still running names this one
    fds_before = _open_fds()
    given = table.give_back(10 ** 6)
    assert given >= 49
    assert _open_fds() == fds_before - given
    assert held.fd >= 0 and os.fstat(held.fd)
    assert all(table._by_id[i].fd < 0 for i in ids[:-1])
    victim = ids[0]
    name = table._by_id[victim].name
    os.rename(lower / "a" / name.decode(), lower / "a" / "moved")
    (lower / "a" / name.decode()).write_text("an impostor")
    st = ops_tree.getattr(CTX, victim, None)[0]  # reopened by handle: the moved file
    assert (st.st_ino, st.st_size) == (os.stat(lower / "a" / "moved").st_ino, len(name) - 1)
    assert table._by_id[victim].fd >= 0
    assert table.give_back(10 ** 6) == 0  # both still named by running requests
    table.request_done()
    assert table.give_back(10 ** 6) == 2
    assert held.fd < 0 and table._by_id[victim].fd < 0


def test_a_walk_larger_than_the_fd_budget_never_runs_out_of_fds(lower, workdir):
    """A daemon limited to 400 fds serves two full walks of a 1,500-file
    tree: the shrinker keeps its fds under the budget (fds given back,
    or the kernel asked to forget), and no caller ever sees EMFILE."""
    for d in range(15):
        (lower / f"d{d}").mkdir()
        for f in range(100):
            (lower / f"d{d}" / f"f{f}").write_text("x")
    mnt = workdir / "mnt"
    mnt.mkdir()
    # fd_limit, not setrlimit alone: a daemon with CAP_SYS_RESOURCE raises it again at start
    with foreground_daemon(lower, mnt, *args(STD), fd_limit=400):
        most = 0
        for _ in range(2):
            walk = subprocess.run(["find", str(mnt), "-ls"], capture_output=True, text=True)
            assert walk.returncode == 0, walk.stderr[-500:]
            assert walk.stdout.count("\n") == 1 + 15 + 1500
            most = max(most, len(os.listdir(f"/proc/{server_pid(mnt)}/fd")))
        assert most <= 400


def test_a_walk_holds_an_fd_a_directory_not_a_file(ext4_lower, workdir):
    """Readdirplus entries of files get nodes without fds (found by their
    handles, ext4 here): walking 3,000 files in 30 directories leaves the
    server with about an fd a directory, and every file then reads back
    through its node (reopened by its handle) with its own content."""
    for d in range(30):
        (ext4_lower / f"d{d}").mkdir()
        for f in range(100):
            (ext4_lower / f"d{d}" / f"f{f}").write_text(f"{d}/{f}")
    mnt = workdir / "mnt"
    mnt.mkdir()
    with foreground_daemon(ext4_lower, mnt, *args(STD)):
        before = len(os.listdir(f"/proc/{server_pid(mnt)}/fd"))
        walk = subprocess.run(["find", str(mnt), "-ls"], capture_output=True, text=True)
        assert walk.returncode == 0 and walk.stdout.count("\n") == 1 + 30 + 3000
        held = len(os.listdir(f"/proc/{server_pid(mnt)}/fd")) - before
        assert 30 <= held < 100, held  # the directories' fds (and a few in flight)
        for d in range(0, 30, 7):
            for f in range(0, 100, 13):
                assert (mnt / f"d{d}" / f"f{f}").read_text() == f"{d}/{f}"


def test_the_table_shrinks_once_the_kernel_forgets_most_nodes(tmp_path):
    """After a big walk the kernel may forget most nodes (memory pressure,
    drop_caches): the table's dicts, which never shrink by themselves, are
    copied to the size of what is left, and the nodes left still resolve."""
    import sys
    from shiftfs.inodes import InodeTable
    for i in range(20000):
        (tmp_path / f"f{i}").touch()
    table = InodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    table.handle_ids = False  # counted ids, kept until forgotten (a handle id is let go)
    try:
        nodes = []
        for i in range(20000):
            node, _st = table.lookup_at(table.root, f"f{i}".encode())
            table.request_done()
            nodes.append(node.node_id)
            if table.open_fds > 1000:
                table.give_back(1000)
        big = sys.getsizeof(table._by_id) + sys.getsizeof(table._by_key)
        for node_id in nodes[:-100]:
            table.forget(node_id, 1)
        small = sys.getsizeof(table._by_id) + sys.getsizeof(table._by_key)
        assert small * 8 < big, (small, big)
        assert len(table) == 101
        for node_id in nodes[-100:]:
            assert os.fstat(table.get(node_id).fd).st_ino == table.peek(node_id).key >> 32
        table.request_done()
    finally:
        table.close()

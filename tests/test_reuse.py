"""A node names one lower inode for its whole life (issue 20, item 1).

The daemon gives back the fds of nodes no request names once it holds too
many (the shrinker, at 60 % of its RLIMIT_NOFILE) and reopens them by file
handle. An inode whose node gave its fd back can be freed, and ext4 gives
its number to the next file made in the same directory at once. The
attack: a mapped user holds an O_PATH fd of its own file (the kernel keeps
its node, no OPEN is sent), makes the daemon give that node's fd back,
unlinks the file, and loops on open("/proc/self/fd/K"); another user's new
file gets the old number. A table that finds nodes by (st_dev, st_ino)
alone re-binds the old node to the new file: the kernel checked the open
against the old attributes, and the daemon opens the new file.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from shiftfs import linux, parking
from shiftfs.inodes import ROOT_ID, InodeTable
from shiftfs.node import HANDLE_IDS

from tests.callers import Caller, Errno
from tests.daemon import foreground_daemon, loop_ext4, restart_server, seen_within, server_pid
from tests.procs import fd_targets
from tests.tables import STD, args

pytestmark = pytest.mark.needs_root

ATTACKER = 101000  # lower 1000
VICTIM = 101001    # lower 1001
FILES = 3000
SECRET = b"the victim's secret\n"


@pytest.fixture
def ext4(workdir):
    """A private ext4 (a loop image) with tmp/ (1777) and FILES empty files
    in many/ to look up."""
    with loop_ext4(workdir / "ext4", "64M", "-N", "8192") as path:
        (path / "tmp").mkdir(mode=0o1777)
        os.chmod(path / "tmp", 0o1777)
        (path / "many").mkdir()
        for i in range(FILES):
            (path / "many" / f"f{i}").touch()
        yield path


# ---- what the callers do (module level: a Caller runs them in its child) ----

def _make_and_hold(path: str) -> int:
    with open(path, "w") as f:
        f.write("the attacker's own\n")
    return os.open(path, os.O_PATH)


def _stat_range(mnt: str, first: int, last: int) -> None:
    for i in range(first, last):
        os.stat(f"{mnt}/many/f{i}")


def _open_until(k: int, stop: str, seconds: float):
    """Open the held O_PATH fd's file again and again until ``stop``
    exists: what each open that succeeded reads, and the errnos of the
    others."""
    fds, errors = [], {}
    deadline = time.monotonic() + seconds
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            fds.append(os.open(f"/proc/self/fd/{k}", os.O_RDONLY))
        except OSError as e:
            errors[e.errno] = errors.get(e.errno, 0) + 1
    read = [os.pread(fd, 100, 0) for fd in fds]
    for fd in fds:
        os.close(fd)
    return read, errors


def _owner_of_fd(k: int):
    st = os.fstat(k)
    return st.st_uid, st.st_mode & 0o7777


def _create_secret(path: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, SECRET)
    finally:
        os.close(fd)


def _daemon_holds(pid: int, path: str) -> bool:
    return path in fd_targets(pid)


@pytest.mark.parametrize("victim_side", ["through the mount", "behind the mount"])
def test_a_reused_inode_number_never_rebinds_a_node(ext4, workdir, victim_side):
    """The attacker's node gives its fd back and its file goes; the
    victim's new 0600 file gets the same inode number (made through the
    mount, or on the lower and then looked up). The attacker's O_PATH fd
    must still name its own (gone) file: no open of it reads the victim's
    data, and its fstat never shows the victim's owner."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    x, secret = ext4 / "tmp" / "x", ext4 / "tmp" / "secret"
    stop = workdir / "stop"
    with foreground_daemon(ext4, mnt, *args(STD), log=workdir / "log",
                           fd_limit=2000) as daemon, \
            Caller(ATTACKER, ATTACKER) as attacker, Caller(VICTIM, VICTIM) as victim:
        k = attacker.call(_make_and_hold, f"{mnt}/tmp/x")
        assert isinstance(k, int), k
        x_ino = os.stat(x).st_ino
        stated = 0
        while _daemon_holds(server_pid(mnt), str(x)):  # 1,200 fds start the shrinker
            assert stated < FILES, "the daemon never gave the node's fd back"
            assert attacker.call(_stat_range, str(mnt), stated, stated + 100) is None
            stated += 100
            time.sleep(0.05)  # the shrinker is a thread of its own
        assert attacker.call(os.unlink, f"{mnt}/tmp/x") is None
        attacker.start(_open_until, k, str(stop), 10.0)
        time.sleep(0.1)
        if victim_side == "through the mount":
            assert victim.call(_create_secret, f"{mnt}/tmp/secret") is None
        else:
            _create_secret(str(secret))
            os.chown(secret, 1001, 1001)
            assert victim.call(os.stat, f"{mnt}/tmp/secret").st_uid == VICTIM
        time.sleep(0.1)
        stop.touch()
        read, errors = attacker.finish()
        assert os.stat(secret).st_ino == x_ino, "precondition: ext4 reused the number"
        assert SECRET not in read, f"the attacker read the victim's file ({errors})"
        # the old node answers ESTALE: its inode is gone (the daemon held no fd of it)
        assert read == [] and set(errors) == {errno.ESTALE}, (read, errors)
        owner = attacker.call(_owner_of_fd, k)
        assert owner == Errno(errno.ESTALE) or owner[0] == ATTACKER, owner
        assert victim.call(_owner_of_fd_path, f"{mnt}/tmp/secret") == (VICTIM, 0o600)


def _owner_of_fd_path(path: str):
    st = os.stat(path)
    return st.st_uid, st.st_mode & 0o7777


# ---- the table's decision, without a mount ----

@pytest.fixture
def table(ext4_lower):
    """An InodeTable over root/ on a private ext4, holding files a and b,
    whose files get counted ids: what they get where a handle cannot be
    an id (generation 0, as mke2fs -d makes them; a number of 2**31 or
    more; tmpfs, btrfs). Handle ids: the tests after handle_table."""
    root = ext4_lower / "root"
    root.mkdir()
    (root / "a").write_text("a")
    (root / "b").write_text("b")
    t = InodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    assert t.handles  # root with CAP_DAC_READ_SEARCH: idle nodes give their fds back
    t.handle_ids = False
    try:
        yield t
    finally:
        t.close()


def _as_number(st: os.stat_result, other: os.stat_result) -> os.stat_result:
    """``other`` with the inode number of ``st``: what a lookup sees when
    the lower gave a freed number to a new file."""
    return os.stat_result((other.st_mode, st.st_ino, st.st_dev, *tuple(other)[3:]))


def _add(table, name: bytes, st=None):
    fd, real = table.open_at(table.root.fd, name)
    node = table.add(fd, st or real, ROOT_ID, name)
    table.request_done()
    return node, real


def test_a_node_that_gave_its_fd_back_is_not_rebound_to_a_reused_number(table):
    """Node n (file a) gives its fd back; a lookup finds file b under a's
    number. b gets a new node, found by that number from then on; n still
    reopens a by its own handle, and once a is gone answers ESTALE."""
    n, st_a = _add(table, b"a")
    assert table.give_back(10) == 1 and n.fd < 0
    m, st_b = _add(table, b"b", _as_number(st_a, os.stat(f"/proc/self/fd/{table.root.fd}/b")))
    assert m is not n and m.fd >= 0
    assert os.fstat(m.fd).st_ino == st_b.st_ino
    assert table.find(st_a.st_dev, st_a.st_ino) is m
    assert n.fd < 0, "the old node took the new file's fd"
    assert table.find(st_a.st_dev, st_a.st_ino, n.handle) is None  # the watcher's question
    assert os.fstat(table.get(n.node_id).fd).st_ino == st_a.st_ino  # a, by its own handle
    table.request_done()
    assert table.give_back(10) == 2
    os.unlink(f"/proc/self/fd/{table.root.fd}/a")
    with pytest.raises(OSError) as info:
        table.get(n.node_id)
    assert info.value.errno == errno.ESTALE
    table.request_done()


def test_a_node_found_by_its_own_inode_takes_the_fd_back(table):
    """The same inode looked up again after its node gave its fd back: the
    same node, with the new fd (no second node for one inode)."""
    n, st_a = _add(table, b"a")
    assert table.give_back(10) == 1 and n.fd < 0
    again, _st = _add(table, b"a")
    assert again is n and n.fd >= 0 and n.nlookup == 2
    assert os.fstat(n.fd).st_ino == st_a.st_ino


def test_a_held_node_is_not_given_to_another_inode_with_its_number(table):
    """A FUSE lower reports its own daemon's inode numbers, which may
    repeat while the inode the table holds lives (bindfs passes on the
    underlying file's): another inode under a held node's number gets a
    node of its own."""
    n, st_a = _add(table, b"a")
    m, _st = _add(table, b"b", _as_number(st_a, os.stat(f"/proc/self/fd/{table.root.fd}/b")))
    assert m is not n
    assert os.fstat(n.fd).st_ino == st_a.st_ino


def test_a_node_whose_fd_was_given_back_leaves_the_numbers_when_its_file_goes(table):
    """release_if_gone for a node that holds no fd: its file's last name
    went (the inode is freed), so its number finds it no more."""
    n, st_a = _add(table, b"a")
    assert table.give_back(10) == 1
    os.unlink(f"/proc/self/fd/{table.root.fd}/a")
    table.release_if_gone(table.find(st_a.st_dev, st_a.st_ino))
    assert table.find(st_a.st_dev, st_a.st_ino) is None
    assert table.forget(n.node_id, 1)


def test_a_node_takes_its_handle_only_when_it_gives_its_fd_back(table):
    """No file handle per lookup: a new node has none; giving its fd back
    takes it from that fd, and the node is reopened by it as its own inode."""
    n, st_a = _add(table, b"a")
    assert n.handle is None
    assert table.give_back(10) == 1 and n.fd < 0 and n.handle is not None
    assert os.fstat(table.get(n.node_id).fd).st_ino == st_a.st_ino
    table.request_done()


def test_a_walk_makes_file_nodes_without_fds_found_by_their_own_handles(table, monkeypatch):
    """add_unopened (readdirplus entries): a file's node holds no fd, only
    the handle taken by name before its attributes; a request reopens that
    inode and no other. If the name changes in between, nothing is made
    (the caller opens the name)."""
    root = f"/proc/self/fd/{table.root.fd}"
    node, st = table.add_unopened(table.root.fd, b"a", ROOT_ID)
    table.request_done()
    assert node.fd < 0 and node.handle is not None and table.open_fds == 1  # the root's
    assert (st.st_ino, os.stat(f"{root}/a").st_ino) == (node.key >> 32,) * 2
    assert os.fstat(table.get(node.node_id).fd).st_ino == st.st_ino  # reopened: a itself
    table.request_done()

    os.mkdir(f"{root}/d")
    assert table.add_unopened(table.root.fd, b"d", ROOT_ID) is None  # directories are opened
    os.link(f"{root}/b", f"{root}/b2")
    assert table.add_unopened(table.root.fd, b"b", ROOT_ID) is None  # and hard links (marks)

    real = linux.name_to_handle

    def then_swapped(fd, flags=0, name=b""):
        handle = real(fd, flags, name)
        if name == b"c":  # the name now names another inode
            os.rename(f"{root}/b2", f"{root}/c")
        return handle
    (Path(root) / "c").write_text("c")
    monkeypatch.setattr(linux, "name_to_handle", then_swapped)
    assert table.add_unopened(table.root.fd, b"c", ROOT_ID) is None


def test_a_walk_never_pairs_a_reused_number_with_the_old_files_handle(ext4, monkeypatch):
    """The file goes between the handle and the stat, and ext4 gives its
    number to a new file (another user's, 0600) at once: the node made has
    the new file's attributes but the old file's handle, so it answers
    ESTALE and never opens the new file."""
    tmp = ext4 / "tmp"
    (tmp / "e").write_text("the attacker's own")
    table = InodeTable(os.open(tmp, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    real = linux.name_to_handle

    def then_reused(fd, flags=0, name=b""):
        handle = real(fd, flags, name)
        if name == b"e":
            os.unlink(tmp / "e")
            fd2 = os.open(tmp / "e", os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd2, SECRET)
            os.close(fd2)
        return handle
    try:
        old = os.stat(tmp / "e").st_ino
        monkeypatch.setattr(linux, "name_to_handle", then_reused)
        node, st = table.add_unopened(table.root.fd, b"e", ROOT_ID)
        table.request_done()
        assert st.st_ino == old == os.stat(tmp / "e").st_ino, "precondition: ext4 reused the number"
        with pytest.raises(OSError) as info:
            table.get(node.node_id)
        assert info.value.errno == errno.ESTALE
        table.request_done()
    finally:
        table.close()


# ---- handle ids: a file's id names its inode, and the table keeps nothing for it ----

@pytest.fixture
def handle_table(ext4):
    """An InodeTable over tmp/ of the private ext4, where a file's handle
    (FILEID_INO32_GEN, a random generation) is its node id."""
    t = InodeTable(os.open(ext4 / "tmp", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "ext4")
    assert t.handle_ids
    try:
        yield t
    finally:
        t.close()


def test_a_walk_keeps_no_node_for_a_file_and_its_id_reopens_it(handle_table):
    """A readdirplus entry of a file: an id at or above HANDLE_IDS, and no
    node, no fd, nothing in the table. A lookup of the same file (another
    name of it too) gives the same id; a request on the id reopens that
    inode, and once it ends the node is parked (its fd kept for the next
    request) until the kernel's FORGET; a lookup is kept (with its fd)
    until its FORGET."""
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    (root / "a").write_text("a")
    node, st = table.add_unopened(table.root.fd, b"a", ROOT_ID)
    table.request_done()
    assert node.node_id >= HANDLE_IDS and node.fd < 0
    assert (len(table), table.open_fds) == (1, 1)  # the root's alone
    assert os.fstat(table.get(node.node_id).fd).st_ino == st.st_ino
    assert len(table) == 2
    table.request_done()
    assert (len(table), table.open_fds) == (2, 2)  # parked
    assert table.forget(node.node_id, 1) and (len(table), table.open_fds) == (1, 1)
    os.link(root / "a", root / "a2")
    n, _st = _add(table, b"a2")
    assert n.node_id == node.node_id and n.fd >= 0 and n.nlookup == 1
    assert table.add_unopened(table.root.fd, b"a", ROOT_ID) is None  # two links: opened (a mark)
    again, _st = _add(table, b"a")
    assert again is n and n.nlookup == 2
    assert not table.forget(n.node_id, 1) and table.peek(n.node_id) is n
    assert table.forget(n.node_id, 1) and (len(table), table.open_fds) == (1, 1)


def test_parked_nodes_are_bounded_and_a_forget_or_a_last_close_without_links_drops_one(
        handle_table, monkeypatch):
    """A request on a walked file's id leaves its node parked with its fd
    (a tar's OPEN, GETATTR and RELEASE of a file then open it by handle
    once), at most PARKED of them: the oldest goes. A FORGET of a parked id
    drops it at once, and so does the last close of a file with no link
    left: a parked fd would keep its blocks from being freed."""
    monkeypatch.setattr(parking, "PARKED", 2)
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    ids = []
    for name in ("p0", "p1", "p2"):
        (root / name).write_text("p")
        ids.append(table.add_unopened(table.root.fd, name.encode(), ROOT_ID)[0].node_id)
    table.request_done()
    for node_id in ids[:2]:
        table.get(node_id)
        table.request_done()
    assert [table.peek(i).fd >= 0 for i in ids[:2]] == [True, True] and table.open_fds == 3
    table.get(ids[2])
    table.request_done()
    assert table.peek(ids[0]) is None and table.open_fds == 3  # the oldest went
    assert table.forget(ids[1], 1) and table.peek(ids[1]) is None and table.open_fds == 2
    node = table.get(ids[2])
    fh, _backing = table.opened(node, os.open(root / "p2", os.O_RDONLY), os.O_RDONLY, 0)
    table.request_done()
    os.unlink(root / "p2")
    table.closed(fh, None, ids[2])
    assert table.peek(ids[2]) is None and (len(table), table.open_fds) == (1, 1)


def test_a_parked_node_goes_once_its_parking_ends_and_a_forget_while_open_parks_nothing(
        handle_table, monkeypatch):
    """A parked node goes at the shrinker's sweep once PARK_SECONDS passed
    (a file replaced behind the mount gets no FORGET until its name is
    looked up again: its fd must not hold its blocks for long). A FORGET
    that comes while the file is open, bringing the count to 0, means the
    kernel holds nothing of it: its last close lets it go, not parks it."""
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    (root / "s").write_text("s")
    sid = table.add_unopened(table.root.fd, b"s", ROOT_ID)[0].node_id
    table.get(sid)
    table.request_done()
    assert table.unpark_old() and table.peek(sid) is not None  # parked just now: stays
    monkeypatch.setattr(parking, "PARK_SECONDS", 0.0)
    assert not table.unpark_old() and table.peek(sid) is None and table.open_fds == 1
    # under load the parker lets the expired go as it parks, not the sweep
    monkeypatch.setattr(parking, "PARK_SECONDS", 0.05)
    ids = []
    for name in ("x", "y"):
        (root / name).write_text(name)
        ids.append(table.add_unopened(table.root.fd, name.encode(), ROOT_ID)[0].node_id)
        table.get(ids[-1])
        table.request_done()
        time.sleep(0.06)
    assert table.peek(ids[0]) is None and table.peek(ids[1]) is not None and table.open_fds == 2
    assert not table.unpark_old() and table.open_fds == 1
    (root / "o").write_text("o")
    node, _st = _add(table, b"o")  # a lookup: counted once, as the kernel does
    fh, _backing = table.opened(node, os.open(root / "o", os.O_RDONLY), os.O_RDONLY, 0)
    table.request_done()
    assert not table.forget(node.node_id, 1) and table.peek(node.node_id) is node
    table.closed(fh, None, node.node_id)
    assert table.peek(node.node_id) is None and (len(table), table.open_fds) == (1, 1)


def test_a_removed_file_given_back_answers_estale_never_the_placeholder(handle_table):
    """A file removed through the mount and given back at once
    (release_if_gone: its fd then points at a placeholder memfd, which
    every such node shares) answers ESTALE: a request on it must never
    read or write the placeholder, where another removed file's would."""
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    (root / "r").write_text("r's own")
    node_id = table.add_unopened(table.root.fd, b"r", ROOT_ID)[0].node_id
    node = table.get(node_id)
    table.request_done()  # parked, fd and all
    os.unlink(root / "r")
    table.release_if_gone(node)
    assert node.released
    with pytest.raises(OSError) as info:
        table.get(node_id)
    assert info.value.errno == errno.ESTALE
    table.request_done()


def _list_read_and_hold(path: str) -> int:
    os.listdir(os.path.dirname(path))
    with open(path, "rb") as f:
        f.read()
    return os.open(path, os.O_PATH)


def _remove_and_write_through(path: str, k: int, data: bytes):
    """Remove ``path``, then reopen it by its O_PATH fd ``k`` and write."""
    os.unlink(path)
    fd = os.open(f"/proc/self/fd/{k}", os.O_RDWR)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _remove_and_read_through(path: str, k: int) -> bytes:
    os.unlink(path)
    fd = os.open(f"/proc/self/fd/{k}", os.O_RDONLY)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_two_removed_files_never_share_what_is_written_to_them(ext4, workdir):
    """The attacker and the victim each list, read and hold (O_PATH) a file
    of their own, then remove it through the mount and reopen it by that
    fd. Given back at once, each node's fd pointed at one shared memfd: the
    attacker's write came back from the victim's read. Each must answer
    ESTALE (its inode is given back), never the other's bytes."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    for name, owner in (("a", 1000), ("b", 1001)):
        (ext4 / "tmp" / name).write_text(f"{name}'s own\n")
        os.chown(ext4 / "tmp" / name, owner, owner)
        os.chmod(ext4 / "tmp" / name, 0o600)
    with foreground_daemon(ext4, mnt, *args(STD), log=workdir / "log"), \
            Caller(ATTACKER, ATTACKER) as attacker, Caller(VICTIM, VICTIM) as victim:
        ka = attacker.call(_list_read_and_hold, f"{mnt}/tmp/a")
        kb = victim.call(_list_read_and_hold, f"{mnt}/tmp/b")
        assert isinstance(ka, int) and isinstance(kb, int), (ka, kb)
        wrote = attacker.call(_remove_and_write_through, f"{mnt}/tmp/a", ka, b"from the attacker")
        read = victim.call(_remove_and_read_through, f"{mnt}/tmp/b", kb)
        assert read != b"from the attacker", "the victim read what the attacker wrote"
        assert (wrote, read) == (Errno(errno.ESTALE), Errno(errno.ESTALE)), (wrote, read)


def test_a_file_replaced_behind_the_mount_is_freed_when_its_parking_ends(ext4, workdir):
    """A file read through the mount (its node parked with its fd), then
    replaced on the lower by a rename over its name: no FORGET comes until
    the name is looked up again, so only the parking's end lets its inode
    (and its blocks) go: within a few seconds, not after 1,024 others."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    old, new = ext4 / "tmp" / "big", ext4 / "tmp" / "new"
    old.write_bytes(b"x" * (1 << 20))
    new.write_bytes(b"y")
    with foreground_daemon(ext4, mnt, *args(STD), log=workdir / "log"):
        os.listdir(mnt / "tmp")
        assert (mnt / "tmp" / "big").read_bytes()[:1] == b"x"
        pid = server_pid(mnt)
        assert _daemon_holds(pid, str(old)), "precondition: its node is parked with its fd"
        os.rename(new, old)
        gone = seen_within(lambda: not any(t.startswith(str(old)) for t in fd_targets(pid)), 10.0, 0.05)
        assert gone is not None, "the daemon still holds the replaced file"
        assert gone < 5.0, gone


def test_a_handle_id_of_a_freed_inode_never_opens_the_file_that_got_its_number(handle_table):
    """The attacker's file, known to the kernel by its id only (a walk),
    goes; ext4 gives its number to the victim's new 0600 file at once. The
    old id answers ESTALE, and the new file gets an id of its own."""
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    (root / "e").write_text("the attacker's own")
    node, st = table.add_unopened(table.root.fd, b"e", ROOT_ID)
    os.unlink(root / "e")
    fd = os.open(root / "secret", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, SECRET)
    os.close(fd)
    assert os.stat(root / "secret").st_ino == st.st_ino, "precondition: ext4 reused the number"
    with pytest.raises(OSError) as info:
        table.get(node.node_id)
    assert info.value.errno == errno.ESTALE
    table.request_done()
    new, _st = table.add_unopened(table.root.fd, b"secret", ROOT_ID)
    assert new.node_id >= HANDLE_IDS and new.node_id != node.node_id
    assert len(table) == 1


def test_an_open_file_known_by_its_id_stays_until_its_last_close(handle_table):
    """An OPEN of a walked file keeps its node while open, even through a
    FORGET (the count began after the kernel's); the last close lets it go."""
    table = handle_table
    root = Path(f"/proc/self/fd/{table.root.fd}")
    (root / "o").write_text("o")
    node_id = table.add_unopened(table.root.fd, b"o", ROOT_ID)[0].node_id
    node = table.get(node_id)
    fh, _backing = table.opened(node, os.open(root / "o", os.O_RDONLY), os.O_RDONLY, 0)
    table.request_done()
    assert not table.forget(node_id, 1) and table.peek(node_id) is node
    table.closed(fh, None, node_id)
    assert table.peek(node_id) is None and (len(table), table.open_fds) == (1, 1)


# ---- red team: handles that prove nothing (generation 0), handles of another filesystem ----

def _gen0_image(workdir: Path, name: str, files: int, owner: int) -> Path:
    """An ext4 image made by mke2fs -d (as container images are built):
    e2fsprogs gives every inode it writes generation 0, and ext4 checks a
    handle's generation only where it is not 0 (ext4_nfs_get_inode), so
    such a handle opens whatever inode has its number now. tmp/ (1777)
    holds ``files`` files f0.. owned by lower ``owner``. Mounted at
    workdir/name."""
    src, img, path = workdir / f"{name}-src", workdir / f"{name}.img", workdir / name
    (src / "tmp").mkdir(parents=True)
    os.chmod(src, 0o755)
    os.chmod(src / "tmp", 0o1777)
    for i in range(files):
        (src / "tmp" / f"f{i}").write_text("the attacker's own\n")
        os.chown(src / "tmp" / f"f{i}", owner, owner)
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "8192", "-d", str(src), str(img)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(path)], check=True)
    return path


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def gen0_ext4(workdir):
    path = _gen0_image(workdir, "gen0", 1, 1000)
    try:
        yield path
    finally:
        _umount(path)


def _walk_and_hold(tmp: str, name: str) -> int:
    """ls -l (one READDIRPLUS), then an O_PATH fd of the entry: no request
    reaches the daemon for it (the name is cached)."""
    for n in os.listdir(tmp):
        os.lstat(f"{tmp}/{n}")
    return os.open(f"{tmp}/{name}", os.O_PATH)


def _handle_generation(path: str) -> int:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return int.from_bytes(linux.name_to_handle(fd)[12:16], "little")
    finally:
        os.close(fd)


def test_a_generation_0_handle_never_reopens_another_file(gen0_ext4, workdir):
    """The lower was built by mke2fs -d: the attacker's file has generation
    0, and its handle names its number, not its inode. A readdirplus gives
    it a node without an fd; the attacker holds it (O_PATH), unlinks the
    file, and the victim's new 0600 file gets the number. The old node
    must answer ESTALE, never open the victim's file."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    x, secret = gen0_ext4 / "tmp" / "f0", gen0_ext4 / "tmp" / "secret"
    assert _handle_generation(str(x)) == 0, "precondition: mke2fs -d writes generation 0"
    stop = workdir / "stop"
    with foreground_daemon(gen0_ext4, mnt, *args(STD), log=workdir / "log") as daemon, \
            Caller(ATTACKER, ATTACKER) as attacker, Caller(VICTIM, VICTIM) as victim:
        k = attacker.call(_walk_and_hold, f"{mnt}/tmp", "f0")
        assert isinstance(k, int), k
        x_ino = os.stat(x).st_ino
        assert attacker.call(os.unlink, f"{mnt}/tmp/f0") is None
        attacker.start(_open_until, k, str(stop), 10.0)
        time.sleep(0.1)
        assert victim.call(_create_secret, f"{mnt}/tmp/secret") is None
        time.sleep(0.1)
        stop.touch()
        read, errors = attacker.finish()
        assert os.stat(secret).st_ino == x_ino, "precondition: ext4 reused the number"
        assert SECRET not in read, f"the attacker read the victim's file ({errors})"
        # its node held an fd (the file, then the empty placeholder of a file gone), or answers ESTALE
        assert set(read) <= {b""} and set(errors) <= {errno.ESTALE}, (read, errors)
        assert os.stat(secret).st_uid == 1001 and os.stat(secret).st_mode & 0o777 == 0o600


def _chmod_held(k: int, mode: int):
    """chmod through the held O_PATH fd (the kernel checks the owner it
    has cached: no LOOKUP, no GETATTR first), then its stat."""
    try:
        os.chmod(f"/proc/self/fd/{k}", mode)
    except OSError as e:
        return Errno(e.errno)
    st = os.stat(f"/proc/self/fd/{k}")
    return st.st_uid, st.st_ino, st.st_mode & 0o7777


def test_a_node_on_a_filesystem_mounted_inside_the_lower_is_never_reopened_on_the_lower(
        ext4, workdir):
    """A filesystem the attacker made (an image, mounted at sub/ of the
    lower) holds its own file with the number the victim's 0600 file has
    on the lower (and generation 0). A server that dies leaves every node
    to be reopened by its handle, through the lower root's mount: a handle
    of the other filesystem must not be decoded there (it names the
    victim's inode there), whatever its inode number says."""
    secret = ext4 / "tmp" / "secret"
    _create_secret(str(secret))
    os.chown(secret, 1001, 1001)
    n = os.stat(secret).st_ino
    (ext4 / "sub").mkdir()
    image = _gen0_image(workdir, "image", n, 1000)  # files f0.. at inodes 13 ..
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(image), str(ext4 / "sub")], check=True)
        ours = next(f"f{i}" for i in range(n) if os.stat(image / "tmp" / f"f{i}").st_ino == n)
        with foreground_daemon(ext4, mnt, *args(STD), log=workdir / "log"), \
                Caller(ATTACKER, ATTACKER) as attacker:
            k = attacker.call(os.open, f"{mnt}/sub/tmp/{ours}", os.O_PATH)
            assert isinstance(k, int), k
            assert attacker.call(os.stat, f"/proc/self/fd/{k}").st_uid == ATTACKER
            restart_server(mnt)
            got = attacker.call(_chmod_held, k, 0o666)
            assert os.stat(secret).st_mode & 0o777 == 0o600, f"the victim's file was chmod'ed ({got})"
            assert got == Errno(errno.ESTALE) or got[0] == ATTACKER, got
    finally:
        _umount(ext4 / "sub")
        _umount(image)


def test_a_node_without_an_fd_keeps_its_number_while_its_file_has_a_name(table):
    """release_if_gone of a node that holds no fd (a readdirplus node, or
    one that gave its fd back) whose file got another name meanwhile (a
    link made behind the mount after the UNLINK's stat, or after the last
    RELEASE checked): the inode lives, so its number must still find its
    node: the watcher finds ext4 nodes by number only, and a lookup of the
    other name must not make a second node for one inode."""
    root = f"/proc/self/fd/{table.root.fd}"
    n, st = table.add_unopened(table.root.fd, b"a", ROOT_ID)
    table.request_done()
    assert n.fd < 0
    os.link(f"{root}/a", f"{root}/a2")
    os.unlink(f"{root}/a")
    table.release_if_gone(n)
    assert table.find(st.st_dev, st.st_ino, n.handle) is n
    again, _st = _add(table, b"a2")
    assert again is n


def test_a_restarted_server_never_reopens_a_generation_0_handle(gen0_ext4, workdir):
    """A server that dies leaves every node without an fd, to be reopened
    by its handle: a generation-0 one (mke2fs -d) names the number only.
    The attacker holds its file (O_PATH) across the restart, unlinks it,
    and the victim's new 0600 file gets the number: the held node must not
    open it (a chmod through it is checked by the kernel against the owner
    it cached, the attacker's)."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    x, secret = gen0_ext4 / "tmp" / "f0", gen0_ext4 / "tmp" / "secret"
    stop = workdir / "stop"
    with foreground_daemon(gen0_ext4, mnt, *args(STD), log=workdir / "log"), \
            Caller(ATTACKER, ATTACKER) as attacker, Caller(VICTIM, VICTIM) as victim:
        k = attacker.call(os.open, f"{mnt}/tmp/f0", os.O_PATH)
        assert isinstance(k, int), k
        x_ino = os.stat(x).st_ino
        restart_server(mnt)
        assert attacker.call(os.unlink, f"{mnt}/tmp/f0") is None
        assert victim.call(_create_secret, f"{mnt}/tmp/secret") is None
        assert os.stat(secret).st_ino == x_ino, "precondition: ext4 reused the number"
        got = attacker.call(_chmod_held, k, 0o666)  # the kernel checks the owner it cached
        assert os.stat(secret).st_mode & 0o777 == 0o600, f"the victim's file was chmod'ed ({got})"
        read, errors = attacker.call(_open_until, k, str(stop), 0.2)
        assert SECRET not in read, f"the attacker read the victim's file ({errors})"

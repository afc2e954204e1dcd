"""What the inode table (inodes.py) holds: a node a lower inode the
kernel holds, and an open file a lower fd held for callers' opens."""

from __future__ import annotations

import os
import stat

from . import linux


# A node's fields cost memory per inode the kernel holds (200,000 after a big
# walk): its key is one int, not a (dev, ino) tuple of two (~100 bytes less),
# and its type bits are one of a few shared ints.
_FILE_TYPES = {t: t for t in range(0, 0o200000, 0o10000)}


def inode_key(dev: int, ino: int) -> int:
    """What identifies a lower inode by number: ``ino`` and ``dev`` (a
    kernel dev_t: 32 bits) in one int."""
    return ino << 32 | dev


def key_of(st: os.stat_result) -> int:
    return st.st_ino << 32 | st.st_dev


# A file's node id may name its inode by itself: the top bit set, the
# inode's number (below 2**31) and generation below it, as an ext4 or xfs
# FILEID_INO32_GEN handle holds them. The daemon then keeps nothing for
# the kernel's reference (a walk of 200,000 files keeps no node a file, and
# a restarted server needs no record of them): a request reopens the
# inode by the handle the id spells, and a freed inode's id opens nothing
# (ESTALE), whatever file gets its number next. Counted ids (directories,
# other filesystems) stay below HANDLE_IDS.
HANDLE_IDS = 1 << 63
def id_of(ino: int, gen: int) -> int:
    """The node id that names inode ``ino`` of generation ``gen``, or 0
    where none can: generation 0 (ext4 decodes it without checking: it
    names a number, not an inode), a number of 2**31 or more."""
    return HANDLE_IDS | ino << 32 | gen if gen and not ino >> 31 else 0


def handle_id(handle: bytes | None) -> int:
    """The node id that names the inode of ``handle`` (id_of), or 0 for a
    handle other than FILEID_INO32_GEN."""
    ino_gen = linux.ino_and_gen(handle)
    return 0 if ino_gen is None else id_of(*ino_gen)


def id_handle(node_id: int) -> bytes:
    """The file handle a handle_id spells."""
    return linux.ino32_gen_handle(node_id >> 32 & 0x7FFFFFFF, node_id & 0xFFFFFFFF)


class Node:
    """One lower inode. ``mode`` is its file type bits (they never change
    for an inode), ``fd`` an O_PATH fd of it, ``key`` its inode_key."""

    __slots__ = ("node_id", "fd", "key", "mode", "nlookup", "parent_id", "name", "opens", "busy",
                 "handle", "used", "stamp", "backing", "fid", "marked",
                 "slot", "released", "forgotten")

    def __init__(self, node_id: int, fd: int, key: int, mode: int) -> None:
        self.node_id, self.fd, self.key, self.mode = node_id, fd, key, _FILE_TYPES[mode]
        self.nlookup = 0
        self.parent_id, self.name = 0, b""  # the last name it was looked up by
        self.opens = 0  # lower file handles open on it
        self.busy = 0  # running requests that named it: its fd stays while > 0
        self.handle: bytes | None = None  # its inode's identity; reopens it once its fd was given back
        self.used = 0  # when a request last named it (InodeTable's clock)
        self.stamp = None  # (size, mtime) at the last open: keep the page cache if unchanged
        self.backing = 0  # passthrough backing id while its opens are passed through
        self.fid: bytes | None = None  # the handle fanotify names it by (watch.py)
        self.marked = False  # a fanotify mark of its own reports its changes (watch.py)
        self.slot = -1  # its slot in the supervisor's journal (supervisor.NodeJournal)
        self.released = False  # its fd was pointed at a placeholder (release_if_gone)
        self.forgotten = False  # FORGET took its last lookup while a request held it

    @property
    def dev(self) -> int:
        """The lower device it is on."""
        return self.key & 0xFFFFFFFF

    @property
    def path(self) -> str:
        """A path the kernel resolves straight to this inode (the magic link
        jumps; a symlink node is not followed), for calls that take no fd."""
        return f"/proc/self/fd/{self.fd}"

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


def by_handle(node_id: int, key: int, mode: int, handle: bytes) -> Node:
    """A node of the handle id ``node_id`` with no fd (opened by ``handle``
    when a request names it)."""
    node = Node(node_id, -1, key, mode)
    node.handle = node.fid = handle
    return node


class OpenFile:
    """A lower fd the daemon holds for callers' opens: of a file (``node``)
    or a directory (``node`` None), of node ``node_id``. ``opens``: the
    opens it serves (more than one only where passed-through opens share
    it, under ``shared``)."""

    __slots__ = ("fd", "node", "node_id", "uid", "opens", "shared")

    def __init__(self, fd: int, node: Node | None, uid: int, shared, node_id: int = 0) -> None:
        self.fd, self.node, self.uid, self.shared = fd, node, uid, shared
        self.node_id = node.node_id if node is not None else node_id
        self.opens = 1

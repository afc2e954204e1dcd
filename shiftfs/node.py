"""What the inode table (inodes.py) holds: a node a lower inode the
kernel holds, and an open file a lower fd held for callers' opens."""

from __future__ import annotations

import os
import stat


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

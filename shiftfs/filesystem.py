"""The contract between the FUSE layer (session.py, protocol.py) and the
handlers (ops.Operations), after virtiofsd's filesystem.rs: what a handler
is told about a request (``Context``), what it may answer (``Entry``,
``Attr``, ``Opened``), what INIT settled (``Granted``), and the handler
interface the FUSE layer calls. No FUSE code here.

A handler takes the context as its first argument and plain values (node
ids, ``bytes`` names, ints) after it; it returns one of the values below,
or raises OSError (the request is answered with its errno; any other
exception is answered with EIO and one log line). Handlers may run on any
serving thread, several at once.

The handler interface (``Operations``) by request, and what each returns:

| request | handler | returns |
|---|---|---|
| LOOKUP | ``lookup(ctx, parent, name)`` | Entry (node 0: negative) |
| FORGET, BATCH_FORGET | ``forget([(node, nlookup), ...])`` | (no reply) |
| GETATTR | ``getattr(ctx, node, fh or None)`` | Attr |
| SETATTR | ``setattr(ctx, node, SetAttr, fh or None)`` | Attr |
| READLINK | ``readlink(ctx, node)`` | bytes |
| MKNOD, MKDIR, SYMLINK, LINK | ``mknod(ctx, parent, name, mode, rdev)``, ``mkdir(ctx, parent, name, mode)``, ``symlink(ctx, target, parent, name)``, ``link(ctx, node, parent, name)`` | Entry |
| UNLINK, RMDIR, RENAME(2) | ``unlink(ctx, parent, name)``, ``rmdir``, ``rename(ctx, parent, name, newparent, newname, flags)`` | None |
| OPEN, CREATE, TMPFILE | ``open(ctx, node, flags)``, ``create(ctx, parent, name, mode, flags)``, ``tmpfile(ctx, parent, mode, flags)`` | Opened; (Entry, Opened) |
| READ, WRITE | served by the FUSE layer on ``fh`` (a lower fd); ``write_kills_suidgid(ctx, node, fh)`` first where the kernel asks |
| (every request with an fh) | ``handed_out(node, fh, directory)``: whether it is an open of that node the handlers handed out; EBADF if not, before the fh is used as an fd | bool |
| RELEASE | ``release(node, fh)`` | None |
| FSYNC, FALLOCATE, COPY_FILE_RANGE, LSEEK | ``fsync(fh, datasync)``, ``fallocate(fh, mode, off, len)``, ``copy_file_range(...)`` | None; int |
| OPENDIR, READDIR(PLUS), RELEASEDIR | ``opendir(ctx, node)`` -> Opened; ``readdir(node, fh, off)`` -> a stream with ``peek()``/``advance()``; ``readdir_entry(ctx, parent, fh, name, d_type)`` -> Entry or None | |
| READDIR(PLUS), FSYNCDIR, directory IOCTL with fh 0 (no-opendir mode) | ``list_open(ctx, node)`` -> an fd for that request; ``list_close(node, fd, ended)`` | |
| GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR | ``getxattr(ctx, node, name)``, ``listxattr(ctx, node)`` -> bytes; ``setxattr(ctx, node, name, value, flags)``, ``removexattr(ctx, node, name)`` | |
| IOCTL | ``ioctl(ctx, node, fh, cmd, arg_in, out_size)`` | (result, bytes) |
| STATFS | ``statfs(ctx, node)`` | os.statvfs_result |

The FUSE layer also calls ``init(Granted, backing)`` once INIT is answered
(``backing``: the session, whose ``backing_open(fd)`` and
``backing_close(id)`` give passthrough backing files where granted),
``worker_started()`` on each serving thread, ``request_done()`` after each
request on the thread that served it, and ``destroy()`` at the end. With
-d it logs each request in the words of ``describe`` (describe.Describer:
``args(op, args)``, ``caller(uid, gid)``).
"""

from __future__ import annotations

import os
from typing import NamedTuple

# SetAttr.valid bits (the kernel's FATTR_*)
SET_ATTR_MODE = 1 << 0
SET_ATTR_UID = 1 << 1
SET_ATTR_GID = 1 << 2
SET_ATTR_SIZE = 1 << 3
SET_ATTR_ATIME = 1 << 4
SET_ATTR_MTIME = 1 << 5
SET_ATTR_ATIME_NOW = 1 << 7
SET_ATTR_MTIME_NOW = 1 << 8
SET_ATTR_CTIME = 1 << 10
SET_ATTR_KILL_SUIDGID = 1 << 11  # a write or truncate by a caller without CAP_FSETID


class Context:
    """Who sent a request: the caller's upper fsuid, fsgid and pid, as the
    request header gives them; ``umask`` for the requests that make an
    entry. The supplementary groups are read on demand (/proc/PID/status),
    once per request."""

    __slots__ = ("uid", "gid", "pid", "umask", "_groups")

    def __init__(self, uid: int, gid: int, pid: int, umask: int = 0) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, umask
        self._groups = None

    def groups(self) -> list[int]:
        """The caller's supplementary groups (upper ids); [] if it is gone."""
        if self._groups is None:
            self._groups = []
            try:
                with open(f"/proc/{self.pid}/task/{self.pid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Groups:"):
                            self._groups = [int(g) for g in line.split()[1:]]
                            break
            except (OSError, ValueError):
                pass
        return self._groups


class Entry(NamedTuple):
    """A LOOKUP-like answer: node 0 is a negative entry (cached for
    ``entry_timeout``); any other counts as one lookup of that node."""

    node_id: int
    st: os.stat_result | None
    uid: int
    gid: int
    attr_timeout: float
    entry_timeout: float


NEGATIVE = Entry(0, None, 0, 0, 0.0, 0.0)


class Attr(NamedTuple):
    """Attributes with upper ids, and how long the kernel may keep them."""

    st: os.stat_result
    uid: int
    gid: int
    timeout: float


class Opened(NamedTuple):
    """An open file or directory: ``fh`` (a lower fd), whether the kernel
    keeps its page cache (or, for a directory, its listing), a passthrough
    backing id (0: none), and ``direct`` for opens whose writes must reach
    the daemon whole (an O_APPEND record is one append)."""

    fh: int
    keep_cache: bool = False
    backing_id: int = 0
    direct: bool = False


class SetAttr(NamedTuple):
    """What a SETATTR carries: ``valid`` (SET_ATTR_* bits) says which of
    the other fields count; ids are upper ids; times are (sec, nsec)."""

    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime: tuple[int, int]
    mtime: tuple[int, int]


class Granted(NamedTuple):
    """What INIT settled with the kernel."""

    minor: int             # the protocol minor in use
    passthrough: bool      # FUSE_PASSTHROUGH: opens may carry a backing id
    killpriv_v2: bool      # the daemon clears set-id bits on the kernel's word
    expire_only: bool      # inval_entry can expire a name without detaching mounts
    max_write: int
    resend: bool = False   # FUSE_NOTIFY_RESEND: a new server gets the dead one's requests
    no_opendir: bool = False  # OPENDIR answered ENOSYS: directories are listed without an open

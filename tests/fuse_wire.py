"""A FUSE session served over a socket instead of /dev/fuse, so a test can
send what the kernel never would (short bodies, unknown ids, INTERRUPT
and FORGET at chosen moments) and see every reply the daemon writes.

``Wire(lower)`` runs shiftfs's own Session and Operations in this process
on one end of a SOCK_SEQPACKET pair (one message per request and per
reply, as /dev/fuse gives them), answers INIT, and lets the test write
requests and read replies on the other end. No mount is made."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

from shiftfs import protocol as P
from shiftfs.idmap import Extent, build_idmap
from shiftfs.ops import Operations
from shiftfs.session import Session

ROOT = 1


class Reply:
    def __init__(self, raw: bytes) -> None:
        self.length, self.error, self.unique = P.OUT_HEADER.unpack_from(raw)
        self.body = raw[P.OUT_HEADER.size:]
        self.raw = raw

    def __repr__(self) -> str:
        err = errno.errorcode.get(-self.error, self.error) if self.error else "ok"
        return f"Reply(unique={self.unique}, {err}, {len(self.body)} bytes)"


class LogLines(logging.Handler):
    """Every line the daemon's logger writes, as it would print them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.extend(self.format(record).splitlines())


class Wire:
    def __init__(self, lower, *, slow: bool = False, pool_threads: int = 3,
                 extents=(Extent(0, 0, 65536),)) -> None:
        self.ops = Operations(str(lower), build_idmap(list(extents), list(extents)))
        ours, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, self.sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._ours = ours
        self.log = LogLines()
        logging.getLogger("shiftfs").addHandler(self.log)
        self.session = Session(self.ops, ours.fileno(), slow=slow, pool_threads=pool_threads)
        self.session.start()
        self._unique = 0
        self.pending: list[Reply] = []  # read while waiting for another
        u = self.send(P.INIT, 0, P.INIT_IN.pack(P.KERNEL_MAJOR, P.KERNEL_MINOR, 1 << 20,
                                                 P.INIT_EXT | P.DO_READDIRPLUS, 0))
        init = self.reply(u)
        assert init.error == 0, init

    # ---- requests ----
    def send(self, op: int, nodeid: int, body: bytes = b"", *, uid: int = 0, gid: int = 0,
             pid: int | None = None, unique: int | None = None) -> int:
        if unique is None:
            self._unique += 2
            unique = self._unique
        header = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), op, unique, nodeid, uid, gid,
                                  os.getpid() if pid is None else pid, 0, 0)
        self.sock.send(header + body)
        return unique

    def next_reply(self, timeout: float = 10.0) -> Reply | None:
        if self.pending:
            return self.pending.pop(0)
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        return Reply(self.sock.recv(8 << 20))

    def reply(self, unique: int, timeout: float = 10.0) -> Reply:
        """The reply to request ``unique`` (others read meanwhile are kept)."""
        for i, r in enumerate(self.pending):
            if r.unique == unique:
                return self.pending.pop(i)
        while True:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError(f"no reply to request {unique} within {timeout} s")
            r = Reply(self.sock.recv(8 << 20))
            if r.unique == unique:
                return r
            self.pending.append(r)

    def call(self, op: int, nodeid: int, body: bytes = b"", **kw) -> Reply:
        return self.reply(self.send(op, nodeid, body, **kw))

    def lookup(self, parent: int, name: bytes) -> tuple[int, Reply]:
        r = self.call(P.LOOKUP, parent, name + b"\0")
        return (P.ENTRY_OUT.unpack_from(r.body)[0] if r.error == 0 else 0), r

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        r = self.call(P.OPEN, nodeid, P.OPEN_IN.pack(flags, 0))
        assert r.error == 0, r
        return P.OPEN_OUT.unpack_from(r.body)[0]

    def silence(self, timeout: float = 0.3) -> list[Reply]:
        """Whatever replies come within ``timeout`` (none expected)."""
        out = list(self.pending)
        self.pending.clear()
        while select.select([self.sock], [], [], timeout)[0]:
            out.append(Reply(self.sock.recv(8 << 20)))
        return out

    def alive(self) -> bool:
        """The reader still answers (a GETATTR of the root)."""
        r = self.call(P.GETATTR, ROOT, P.GETATTR_IN.pack(0, 0, 0))
        return r.error == 0

    def close(self) -> None:
        logging.getLogger("shiftfs").removeHandler(self.log)
        self.sock.shutdown(socket.SHUT_RDWR)
        self.session._done.set()
        for _ in range(self.session._pool_threads):
            self.session._pool.put(None)
        for t in self.session._threads:
            t.join(5)
        self.sock.close()
        self._ours.close()
        self.ops.destroy()


def forget_batch(pairs) -> bytes:
    return P.BATCH_FORGET_IN.pack(len(pairs), 0) + b"".join(P.FORGET_ONE.pack(*p) for p in pairs)


def dirents(body: bytes, plus: bool) -> list[tuple[bytes, int, int]]:
    """(name, d_off, nodeid) of each entry of a READDIR(PLUS) reply."""
    out, pos = [], 0
    while pos < len(body):
        node = 0
        if plus:
            node = P.ENTRY_OUT.unpack_from(body, pos)[0]
            pos += P.ENTRY_OUT.size
        ino, off, namelen, _type = P.DIRENT.unpack_from(body, pos)
        name = body[pos + P.DIRENT.size:pos + P.DIRENT.size + namelen]
        out.append((name, off, node))
        pos += (P.DIRENT.size + namelen + 7) & ~7
    return out

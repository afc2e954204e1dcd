"""A daemon that can die: the /dev/fuse file outlives the process that
serves it.

The **supervisor** is the long-lived process of a mount. It holds the
/dev/fuse fd, the mount (to unmount it at the end), and what names nodes
and open files, and it forks a **server** (session.py + ops.py) that does
all the work. When a server dies, for any reason, the supervisor forks a
new one on the same fd; that one rebuilds its tables from what survived
and asks the kernel to resend the requests the dead one had read and not
answered (FUSE_NOTIFY_RESEND, Linux 6.9). Callers see nothing: no
ENOTCONN, no EIO; their open files and cwds keep working. The supervisor
runs no handler code and no threads: a bug in a handler cannot kill it.

What survives a server:
- the node table (node id -> lower inode by file handle, lookup count,
  passthrough backing id), kept by the server in a shared memfd of fixed
  slots (``NodeJournal``: memory writes only, no syscall); the new server
  reopens each node by its handle when next named, and a node whose inode
  is gone answers ESTALE, as after a server reboot on NFS;
- the open files: each lower fd the server holds for a caller's open (the
  fh the kernel has) is passed to the supervisor when it is opened
  (SCM_RIGHTS) and given back when it is released; a new server gets them
  at the same fd numbers, so every fh the kernel holds stays valid, also
  for files unlinked while open;
- what INIT settled (protocol minor, passthrough, KILLPRIV_V2), in the
  journal's header.

An upgrade (``shiftfs upgrade MNT``, SIGUSR2 to the supervisor) is the
same step with a new program: the supervisor checks that the installed
version can read the journal (it refuses and keeps the old server where
it cannot), ends the server, and re-executes itself with every fd kept.
"""

from __future__ import annotations

import array
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from . import linux
from .filesystem import Granted

log = logging.getLogger("shiftfs")

STATE_VERSION = 2
MAGIC = b"shiftfs\0"
# magic, version, next node id, slots in use (high-water mark), protocol minor, INIT grants,
# slot size (0 until the first server sets it from its root's handle: fit)
HEADER = struct.Struct("=8sIQQIII")
GRANT_PASSTHROUGH, GRANT_KILLPRIV_V2, GRANT_EXPIRE_ONLY, GRANT_RESEND = 1, 2, 4, 8
GRANT_NO_OPENDIR = 16
# node id, nlookup, parent id, ino, dev, backing id, mode, handle length; the handle follows
SLOT = struct.Struct("=QQQQIiHH")
# A slot a node, 200,000 of them after a big walk, sized for the root's
# handle with 4 bytes to spare (the handles below it are as long, or
# nearly): 64 bytes for ext4's (16) and xfs's (16; 20 past 2^32 inodes),
# 96 for tmpfs (20), btrfs (28) and overlayfs (~40), 192 for NFS (up to 136).
# The slots start after the header's own 192 bytes.
SLOT_SIZES = (64, 96, 192)
SLOTS_AT = 192
JOURNAL_BYTES = 1 << 30  # sparse: pages exist only where slots were written
# server -> supervisor: kind (OPEN, SHARE, CLOSE, READY, FLUSHED), fh, node id, uid, flags
MSG = struct.Struct("=BqQII")
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)  # one fd a message
BATCH_RECORDS = 64  # SHAREs and CLOSEs waiting for the next OPEN, at most (FdStore)
FLUSH_DELAY = 0.02  # how long they wait for one
OPEN, SHARE, CLOSE, READY, FLUSHED = 1, 2, 3, 4, 5
RESTART_PAUSE = 0.05  # between restarts of a server that keeps dying at once
# After a batch of messages the supervisor lets the next ones gather for
# this long: an fd in flight stays open in the socket, so nothing is lost
# if the server dies meanwhile, and a create no longer wakes it twice.
GATHER_PAUSE = 0.005


class NodeJournal:
    """The node table as slots in a shared memfd, written by the server as
    it changes (``put``, ``count``, ``drop``) and read by the next one
    (``records``). A slot is written before the reply that hands its node
    to the kernel, so a count is never lower than the kernel's (at worst
    one higher after a resent LOOKUP: a node kept a little longer)."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("shiftfs-nodes", 0)  # not CLOEXEC: kept across an upgrade
            os.ftruncate(fd, JOURNAL_BYTES)
            self.map = mmap.mmap(fd, JOURNAL_BYTES)
            HEADER.pack_into(self.map, 0, MAGIC, STATE_VERSION, 0, 0, 0, 0, 0)
        else:
            self.map = mmap.mmap(fd, JOURNAL_BYTES)
            magic, version = HEADER.unpack_from(self.map, 0)[:2]
            if magic != MAGIC or version != STATE_VERSION:
                raise ValueError(f"journal version {version} is not {STATE_VERSION}")
        self.fd = fd
        self.reload()

    def reload(self) -> None:
        """Take up what an earlier server wrote (a forked server starts
        with the supervisor's view of the header, which it never writes)."""
        _, _, _, self.high, _, _, size = HEADER.unpack_from(self.map, 0)
        self.slot_size = size or SLOT_SIZES[-1]
        # an array, not a list: no int object a free slot (200,000 of them
        # after a big walk is forgotten, each pinning its malloc arena)
        self._free = array.array("I", (i for i in range(self.high) if not self._node_at(i)))

    def fit(self, handle: bytes | None) -> None:
        """A first server sizes the slots for its root's file handle: the
        handles of the nodes below it are as long, or nearly."""
        if HEADER.unpack_from(self.map, 0)[6]:
            return
        need = SLOT.size + len(handle or b"") + 4
        self.slot_size = next((size for size in SLOT_SIZES if size >= need), SLOT_SIZES[-1])
        struct.pack_into("=I", self.map, 36, self.slot_size)

    def _at(self, i: int) -> int:
        return SLOTS_AT + self.slot_size * i

    def _node_at(self, i: int) -> int:
        return struct.unpack_from("=Q", self.map, self._at(i))[0]

    def granted(self, max_write: int) -> Granted:
        """What INIT settled, as the first server wrote it (set_granted)."""
        _, _, _, _, minor, bits, _ = HEADER.unpack_from(self.map, 0)
        return Granted(minor, bool(bits & GRANT_PASSTHROUGH), bool(bits & GRANT_KILLPRIV_V2),
                       bool(bits & GRANT_EXPIRE_ONLY), max_write, bool(bits & GRANT_RESEND),
                       bool(bits & GRANT_NO_OPENDIR))

    def set_granted(self, g: Granted) -> None:
        struct.pack_into("=II", self.map, 28, g.minor,
                         GRANT_PASSTHROUGH * g.passthrough + GRANT_KILLPRIV_V2 * g.killpriv_v2
                         + GRANT_EXPIRE_ONLY * g.expire_only + GRANT_RESEND * g.resend
                         + GRANT_NO_OPENDIR * g.no_opendir)

    def set_next_id(self, next_id: int) -> None:
        struct.pack_into("=Q", self.map, 12, next_id)

    def next_id(self) -> int:
        return struct.unpack_from("=Q", self.map, 12)[0]

    def put(self, node) -> None:
        """Write the whole slot of ``node`` (taking one if it has none). A
        handle longer than the slot holds is not kept (cannot happen on
        one filesystem: see fit): the next server answers ESTALE for it."""
        slot = node.slot
        if slot < 0:
            if self._free:
                slot = self._free.pop()
            else:
                slot, self.high = self.high, self.high + 1
                struct.pack_into("=Q", self.map, 20, self.high)
            node.slot = slot
        handle = node.handle or b""
        if len(handle) > self.slot_size - SLOT.size:
            handle = b""
        at = self._at(slot)
        SLOT.pack_into(self.map, at, node.node_id, node.nlookup, node.parent_id, node.key >> 32,
                       node.dev, node.backing, node.mode, len(handle))
        self.map[at + SLOT.size:at + SLOT.size + len(handle)] = handle

    def count(self, node) -> None:
        struct.pack_into("=Q", self.map, self._at(node.slot) + 8, node.nlookup)

    def drop(self, node) -> None:
        if node.slot >= 0:
            struct.pack_into("=Q", self.map, self._at(node.slot), 0)
            self._free.append(node.slot)
            node.slot = -1

    def records(self):
        """(slot, node id, nlookup, parent id, (dev, ino), mode, backing, handle) in use."""
        self.reload()
        for i in range(self.high):
            at = self._at(i)
            node_id, nlookup, parent, ino, dev, backing, mode, hlen = SLOT.unpack_from(self.map, at)
            if node_id:
                handle = bytes(self.map[at + SLOT.size:at + SLOT.size + hlen]) if hlen else None
                yield i, node_id, nlookup, parent, (dev, ino), mode, backing, handle


class FdStore:
    """The server's side of the open-file store: each lower fd held for a
    caller's open goes to the supervisor, which keeps a copy until the
    fh is released.

    An OPEN goes at once, with its fd, before the reply hands the fh to
    the kernel: from then on the fd is in flight in the socket or in the
    supervisor's hands, and outlives the server. SHAREs and CLOSEs wait
    and ride on the next OPEN's message, in order (an fd number a CLOSE
    frees may be the next OPEN's), so a create costs one message, not
    two; a server that dies with some unsent leaves the supervisor
    holding a copy the kernel released (a leak until unmount, never a
    wrong file: an fh the kernel still has is never in the queue). They
    go within ``FLUSH_DELAY`` at the latest (the copy of a closed file
    keeps its inode, and a write-mode copy denies an exec on the lower),
    and at once for a file whose last name is gone (its space is freed
    now, as on a local filesystem)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._ending = False  # flushed for an upgrade: every record goes at once
        threading.Thread(target=self._flusher, name="shiftfs-store", daemon=True).start()

    def held(self, fh: int, node_id: int, uid: int, flags: int) -> None:
        self._queue(MSG.pack(OPEN, fh, node_id, uid, flags), now=True, fd=fh)

    def shared(self, fh: int) -> None:
        self._queue(MSG.pack(SHARE, fh, 0, 0, 0))

    def released(self, fh: int, now: bool = False) -> None:
        self._queue(MSG.pack(CLOSE, fh, 0, 0, 0), now)

    def _queue(self, record: bytes, now: bool = False, fd: int | None = None) -> None:
        """``record`` after those waiting; ``now``: all of them sent at once
        (with ``fd``), else they wait (BATCH_RECORDS at most)."""
        with self._lock:
            self._pending.append(record)
            if now or self._ending or len(self._pending) >= BATCH_RECORDS:
                self._send(fd)
            elif len(self._pending) == 1:
                self._wanted.set()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._send()

    def _send(self, fd: int | None = None) -> None:
        # under the lock: every waiting record in one message, ``fd`` with it
        records, self._pending = b"".join(self._pending), []
        if fd is None:
            self.sock.send(records)
        else:
            self.sock.sendmsg([records], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [fd]))])

    def _flusher(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            time.sleep(FLUSH_DELAY)
            try:
                self.flush()
            except OSError:
                return  # the supervisor is gone: so is the mount

    def ready(self) -> None:
        self._say(READY)

    def flushed(self) -> None:
        """Everything waiting sent, and FLUSHED after it: the supervisor
        asks (SIGUSR1) before it ends the server for an upgrade. The server
        serves requests until it is killed: from now on each record goes
        at once, before its reply (a CLOSE left waiting would die with the
        server, and the supervisor keep a copy of a released file)."""
        with self._lock:
            self._ending = True
        self._say(FLUSHED)

    def _say(self, kind: int) -> None:
        self._queue(MSG.pack(kind, 0, 0, 0, 0), now=True)


class Held:
    """One open file as the supervisor keeps it: its own copy of the fd,
    and what the server needs to take the fh up again."""

    __slots__ = ("fd", "node_id", "uid", "flags", "opens")

    def __init__(self, fd: int, node_id: int, uid: int, flags: int, opens: int = 1) -> None:
        self.fd, self.node_id, self.uid, self.flags, self.opens = fd, node_id, uid, flags, opens


def _status_dir() -> str:
    if os.geteuid() == 0:
        return "/run/shiftfs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/shiftfs-{os.geteuid()}",
                        "shiftfs")


def status_path(mountpoint: str) -> str:
    """Where the supervisor of the mount at ``mountpoint`` says who it is."""
    name = os.path.realpath(mountpoint).encode().hex()
    return os.path.join(_status_dir(), name[:200] + ".json")


def read_status(mountpoint: str) -> dict | None:
    try:
        with open(status_path(mountpoint), encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        os.kill(status["supervisor"], 0)
    except OSError:
        return None  # left by a supervisor that is gone
    return status


class Supervisor:
    """Holds the mount's /dev/fuse ``device_fd`` and forks servers:
    ``start_server(journal, sock, held, restored)`` runs in each forked
    child and never returns (it exits 0 when the mount is gone).
    ``unmount()`` ends the mount at SIGTERM/SIGINT/SIGHUP; ``resume_args``
    is what an upgraded supervisor needs to take over (JSON-able)."""

    def __init__(self, device_fd: int, mountpoint: str, start_server, unmount,
                 resume_args: dict, journal: NodeJournal | None = None,
                 held: dict[int, Held] | None = None, restarts: int = 0,
                 status: str = "") -> None:
        self.device_fd, self.mountpoint = device_fd, mountpoint
        self.start_server, self.unmount, self.resume_args = start_server, unmount, resume_args
        self.journal = journal or NodeJournal()
        self.held: dict[int, Held] = held or {}
        self.restarts = restarts
        self.server_pid = 0
        # resolved now, before the mount is there: the supervisor never
        # touches the mount (a request to it would wait for a server that
        # may be the dead one it is about to replace)
        self._status = status  # resolved before the mount was there (status_path)
        self._sock: socket.socket | None = None
        self._ending = False
        self._upgrade = False
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._unmounted = False
        # from the start: a signal sent as soon as the mount is live never
        # finds the default action (death, the mount left behind)
        signal.set_wakeup_fd(self._signal_w)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_end)
        signal.signal(signal.SIGUSR2, self._on_upgrade)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select

    # ---- servers ----------------------------------------------------------
    def fork_server(self, restored: bool) -> None:
        """Fork a server; it reports READY once it serves."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # room for the messages of a gathering pause (capped at wmem_max)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        pid = os.fork()
        if pid == 0:
            try:
                linux.die_with_parent()
                if os.getppid() == 1:  # the supervisor died before that took effect
                    os._exit(1)
                ours.close()
                os.close(self._signal_r)
                os.close(self._signal_w)
                # above every fh a held fd goes to: the socket's number may
                # be one the dead server had given an open file
                top = max([theirs.fileno(), *self.held, *(h.fd for h in self.held.values())]) + 1
                low = theirs.detach()
                theirs = socket.socket(fileno=fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, top))
                os.close(low)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2,
                          signal.SIGCHLD):
                    signal.signal(s, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                held = _place(self.held)
                code = self.start_server(self.journal, theirs, held, restored)
            except BaseException:  # noqa: B902 (a child never returns into the supervisor)
                log.exception("server failed")
                code = 70
            os._exit(code)
        theirs.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = ours
        self.server_pid = pid
        self.write_status()

    def wait_ready(self, timeout: float) -> bool:
        """Serve the server's messages until it says READY (or dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if r and self._receive() == READY:
                return True
            pid, _status = os.waitpid(self.server_pid, os.WNOHANG)
            if pid:
                self.server_pid = 0
                return False
        return False

    def _receive(self, wait: bool = True) -> int:
        """One message from the server (its open files: records in order,
        an OPEN's fd with it); the last record's kind, 0 when the server
        is gone (or, not ``wait``ing, when none is queued)."""
        try:
            data, anc, _flags, _addr = self._sock.recvmsg(
                MSG.size * (BATCH_RECORDS + 1), _FD_SPACE, 0 if wait else socket.MSG_DONTWAIT)
        except OSError:
            return 0
        if not data:
            return 0
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        fds = list(fds)
        kind = 0
        for kind, fh, node_id, uid, flags in MSG.iter_unpack(data[:len(data) - len(data) % MSG.size]):
            if kind == OPEN and fds:
                old = self.held.pop(fh, None)
                if old is not None:  # the fh was closed without a word (cannot happen)
                    os.close(old.fd)
                self.held[fh] = Held(fds.pop(0), node_id, uid, flags)
            elif kind == SHARE and fh in self.held:
                self.held[fh].opens += 1
            elif kind == CLOSE and fh in self.held:
                h = self.held[fh]
                h.opens -= 1
                if not h.opens:
                    del self.held[fh]
                    os.close(h.fd)
        for fd in fds:
            os.close(fd)
        return kind

    # ---- the loop ---------------------------------------------------------
    def run(self) -> int:
        """Until the mount is gone: keep its open files, restart servers
        that die, end the mount on SIGTERM/SIGINT/SIGHUP, upgrade on
        SIGUSR2. Returns the exit status."""
        try:
            while True:
                if self._ending and not self._unmounted:
                    self._unmounted = True
                    try:
                        self.unmount()  # the server then sees ENODEV and exits 0
                    except OSError as e:
                        log.warning("unmount failed: %s", e)
                if self._upgrade:
                    self._upgrade = False
                    self.upgrade()
                try:
                    r, _, _ = select.select([self._sock, self._signal_r], [], [], 1.0)
                except InterruptedError:
                    r = []
                if self._signal_r in r:
                    while True:
                        try:
                            if not os.read(self._signal_r, 64):
                                break
                        except BlockingIOError:
                            break
                gone = False
                if self._sock in r:
                    gone = self._receive() == 0
                    if not gone:  # the batch
                        while self._receive(wait=False):
                            pass
                # messages only: no wait4 (a server that ends wakes the
                # signal pipe with SIGCHLD, or leaves its socket at EOF)
                if r and self._signal_r not in r and not gone:
                    time.sleep(GATHER_PAUSE)
                    continue
                pid, status = os.waitpid(self.server_pid, os.WNOHANG)
                if not pid:
                    continue
                while self._receive():  # what it said before it went
                    pass
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    return 0  # unmounted: the server saw the connection end
                if self._ending:
                    return 0
                self._restart(status)
        finally:
            self.remove_status()

    def _restart(self, status: int) -> None:
        self.restarts += 1
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"status {os.WEXITSTATUS(status)}")
        log.warning("server %d ended (%s); restart %d on the same /dev/fuse", self.server_pid,
                    how, self.restarts)
        if self.restarts > 1 and time.monotonic() - getattr(self, "_last", 0.0) < 1.0:
            time.sleep(RESTART_PAUSE)
        self._last = time.monotonic()
        self.fork_server(restored=True)

    def _on_end(self, signum, frame) -> None:
        self._ending = True

    def _on_upgrade(self, signum, frame) -> None:
        self._upgrade = True

    # ---- upgrade ----------------------------------------------------------
    def _flush_server(self, timeout: float = 2.0) -> None:
        """The CLOSEs the server has not sent yet (FdStore), asked for and
        taken before it is ended: else their copies stay held."""
        try:
            os.kill(self.server_pid, signal.SIGUSR1)
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self._sock], [], [], left)[0] and self._receive() in (FLUSHED, 0):
                return

    def upgrade(self) -> None:
        """Hand the mount to the installed version of shiftfs: refuse (and
        keep serving) unless it can read this journal; else end the server
        and re-execute with every fd kept."""
        check = subprocess.run([sys.executable, "-c",
                                "import sys, shiftfs.supervisor as s; "
                                f"sys.exit(0 if s.STATE_VERSION == {STATE_VERSION} else 1)"],
                               capture_output=True, timeout=60)
        if check.returncode != 0:
            log.error("upgrade refused: the installed shiftfs cannot read this mount's state "
                      "(version %d); the running server stays", STATE_VERSION)
            return
        self._flush_server()
        os.kill(self.server_pid, signal.SIGKILL)
        os.waitpid(self.server_pid, 0)
        while self._receive():
            pass
        state = dict(self.resume_args, device_fd=self.device_fd, journal_fd=self.journal.fd,
                     status=self._status,
                     restarts=self.restarts + 1,
                     held={fh: [h.fd, h.node_id, h.uid, h.flags, h.opens]
                           for fh, h in self.held.items()})
        keep = [self.device_fd, self.journal.fd] + [h.fd for h in self.held.values()]
        for fd in keep:
            os.set_inheritable(fd, True)
        blob = os.memfd_create("shiftfs-resume", 0)
        os.write(blob, json.dumps(state).encode())
        os.lseek(blob, 0, os.SEEK_SET)
        log.warning("upgrading: server %d ended, re-executing %s", self.server_pid, sys.executable)
        self.remove_status()
        os.execv(sys.executable, [sys.executable, "-m", "shiftfs", "--resume", str(blob)])

    # ---- status -----------------------------------------------------------
    def write_status(self) -> None:
        path = self._status
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"supervisor": os.getpid(), "server": self.server_pid,
                           "restarts": self.restarts, "mountpoint": self.mountpoint,
                           "open_files": len(self.held)}, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("status not written (%s): %s", path, e.strerror)

    def remove_status(self) -> None:
        try:
            os.unlink(self._status)
        except OSError:
            pass


def _place(held: dict[int, Held]) -> dict[int, Held]:
    """In a new server: each held fd at its fh number, the number the
    kernel has (first out of the way, so no placement clobbers another)."""
    if not held:
        return {}
    top = max(max(held), max(h.fd for h in held.values())) + 1
    moved = {}
    for fh, h in held.items():
        moved[fh] = fcntl.fcntl(h.fd, fcntl.F_DUPFD_CLOEXEC, top)
        os.close(h.fd)
    out = {}
    for fh, h in held.items():
        os.dup2(moved[fh], fh, inheritable=False)
        os.close(moved[fh])
        out[fh] = Held(fh, h.node_id, h.uid, h.flags, h.opens)
    return out



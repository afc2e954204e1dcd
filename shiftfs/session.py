"""Serving the FUSE protocol on a /dev/fuse fd: read a request into a
preallocated buffer, parse it with protocol.py's structs, call the handler
(filesystem.py's interface, ops.Operations), answer with one writev; a
big READ's data goes from the lower file to /dev/fuse through pipes
(splice.py), in no Python object.

Threads. One reader serves, where it reads them, every request that
cannot block for long (lookups, attributes, opens, small reads and writes
on a local lower). Requests that can (fsync, fallocate, copy_file_range,
syncfs, reads and writes over ``POOL_BYTES``, and every request on a lower
marked ``slow``: FUSE and network filesystems) go to a small pool whose
threads reply themselves, so no caller's stat waits behind another's
fsync. A request handed to the pool takes the reader's buffer with it (the
reader takes a free one), so nothing is copied.

Every request but FORGET, BATCH_FORGET and INTERRUPT is answered exactly
once: a handler that raises OSError is answered with its errno, any other
exception with EIO and one log line. A reply the kernel refuses with
ENOENT is to a request it has abandoned (the caller was interrupted): not
an error, but an OPEN or CREATE answered so is released again.

The session also sends the notifications the daemon makes on its own
(inval_inode, inval_entry with or without FUSE_EXPIRE_ONLY, delete) and
registers passthrough backing files (ioctls on the same fd)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import signal
import struct
import sys
import threading

from . import listing, negotiate, splice
from . import protocol as P
from .negotiate import MAX_WRITE
from .filesystem import Context, Granted, Opened, SetAttr

log = logging.getLogger("shiftfs")

POOL_BYTES = 1 << 17         # reads and writes larger than this go to the pool
POOL_THREADS = 3
_BUF_SIZE = MAX_WRITE + 4096  # the kernel wants room for max_write and the headers
_HEADER = P.IN_HEADER.size
_POOLED = frozenset((P.FSYNC, P.FSYNCDIR, P.FALLOCATE, P.COPY_FILE_RANGE))
# no reply at all; every opcode without a handler is answered ENOSYS (FLUSH,
# ACCESS, locks, BMAP, POLL, STATX: the kernel then does without, or by itself)
_NO_REPLY = frozenset((P.FORGET, P.BATCH_FORGET, P.INTERRUPT))
_OUT_HEADER = P.OUT_HEADER.pack

class Session:
    """Serves ``fs`` (the handler object) on the /dev/fuse ``fd``.

    ``passthrough``/``killpriv_v2``: asked for at INIT (granted where the
    kernel offers them); ``slow``: every request goes to the pool (a lower
    that may block: FUSE, network); ``debug``: one line per request on
    stderr."""

    def __init__(self, fs, fd: int, *, passthrough: bool = False, killpriv_v2: bool = False,
                 max_readahead: int = 1 << 20, slow: bool = False, debug: bool = False,
                 pool_threads: int = POOL_THREADS, granted: Granted | None = None) -> None:
        self.fs, self.fd = fs, fd
        self._want_passthrough, self._want_killpriv_v2 = passthrough, killpriv_v2
        self.max_readahead = max_readahead
        self.slow, self.debug = slow, debug
        self.granted: Granted | None = granted  # given: INIT was answered by an earlier server
        self.init_error: BaseException | None = None
        self.inited = threading.Event()
        self._done = threading.Event()
        self.unmounted = False  # the reader saw the connection end
        self._free: list[bytearray] = []
        self._free_lock = threading.Lock()
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pool_threads = max(1, pool_threads)
        self._old_signals: dict | None = None
        self.expire_only = bool(granted and granted.expire_only)
        self.can_prune = bool(granted and granted.minor >= 45)  # FUSE_NOTIFY_PRUNE, Linux 6.18
        self.no_opendir = bool(granted and granted.no_opendir)
        self._request_done = fs.request_done
        self._splicer = splice.Splicer(MAX_WRITE)
        self._ops = {
            P.LOOKUP: self._lookup, P.GETATTR: self._getattr, P.SETATTR: self._setattr,
            P.READLINK: self._readlink, P.SYMLINK: self._symlink, P.MKNOD: self._mknod,
            P.MKDIR: self._mkdir, P.UNLINK: self._unlink, P.RMDIR: self._rmdir,
            P.RENAME: self._rename, P.RENAME2: self._rename2, P.LINK: self._link,
            P.OPEN: self._open, P.READ: self._read, P.WRITE: self._write,
            P.STATFS: self._statfs, P.RELEASE: self._release, P.FSYNC: self._fsync,
            P.SETXATTR: self._setxattr, P.GETXATTR: self._getxattr,
            P.LISTXATTR: self._listxattr, P.REMOVEXATTR: self._removexattr,
            P.OPENDIR: self._opendir, P.READDIR: self._readdir,
            P.READDIRPLUS: self._readdirplus, P.RELEASEDIR: self._releasedir,
            P.FSYNCDIR: self._fsyncdir, P.CREATE: self._create, P.TMPFILE: self._tmpfile,
            P.FALLOCATE: self._fallocate, P.LSEEK: self._lseek,
            P.COPY_FILE_RANGE: self._copy_file_range, P.IOCTL: self._ioctl,
            P.DESTROY: self._destroy,
        }

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Start the reader and the pool (they answer INIT, too; a server
        taking over from a dead one starts with what INIT settled, and
        should then ``resend()``)."""
        if self.granted is not None:
            self.fs.init(self.granted, self)
            self.inited.set()
        for i in range(self._pool_threads):
            self._spawn(self._pool_worker, f"shiftfs-pool-{i}")
        self._spawn(self._reader, "shiftfs-reader")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def catch_signals(self) -> None:
        """From now on SIGTERM/SIGINT/SIGHUP end the session (wait() then
        unmounts): called before the mount goes live, so that a signal sent
        as soon as it is never finds the default action (death, mount left)."""
        if self._old_signals is not None:
            return

        def on_signal(signum, frame):
            self._done.set()

        self._old_signals = {s: signal.signal(s, on_signal)
                             for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def wait(self, unmount=None, signals: bool = True) -> None:
        """Serve until unmounted (the reader sees ENODEV) or, with
        ``signals``, a SIGTERM/SIGINT/SIGHUP; then ``unmount()`` (the
        mount's own way) and stop the threads. A supervised server takes
        no signals: its supervisor ends the mount."""
        if signals:
            self.catch_signals()
        old, self._old_signals = self._old_signals or {}, None
        try:
            while not self._done.wait(0.5):
                pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if unmount is not None:
                try:
                    unmount()
                except OSError:
                    pass  # already gone
            for _ in range(self._pool_threads):
                self._pool.put(None)
            for t in self._threads:
                t.join(5)
            try:
                self.fs.destroy()
            except Exception:  # noqa: BLE001
                log.exception("destroy failed")

    # ---- reading ------------------------------------------------------------
    def _buffer(self) -> bytearray:
        with self._free_lock:
            if self._free:
                return self._free.pop()
        return bytearray(_BUF_SIZE)

    def _give_buffer(self, buf: bytearray) -> None:
        with self._free_lock:
            if len(self._free) < 8:
                self._free.append(buf)

    def _reader(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        self.fs.worker_started()
        fd = self.fd
        buf = self._buffer()
        view = memoryview(buf)
        header = P.IN_HEADER.unpack_from
        try:
            while True:
                try:
                    n = os.readv(fd, (buf,))
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EAGAIN):  # an interrupted request: gone
                        continue
                    if e.errno == errno.ENODEV:  # unmounted
                        self.unmounted = True
                    else:
                        log.error("reading /dev/fuse failed: %s", e.strerror)
                    return
                if n < _HEADER:  # never from /dev/fuse: nothing to answer (no unique)
                    if n == 0:  # end of file: a socket's peer went (tests)
                        return
                    log.error("request of %d bytes, shorter than its header: ignored", n)
                    continue
                length, op, unique, nodeid, uid, gid, pid, _ext, _pad = header(buf, 0)
                if op == P.INIT:
                    self._init(unique, view[40:n])
                    continue
                if self.slow or op in _POOLED or (
                        (op == P.READ or op == P.WRITE) and n > POOL_BYTES):
                    self._pool.put((buf, view, n))
                    buf = self._buffer()
                    view = memoryview(buf)
                    continue
                self._serve(view, n, op, unique, nodeid, uid, gid, pid)
        finally:
            self._done.set()

    def _pool_worker(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        self.fs.worker_started()
        header = P.IN_HEADER.unpack_from
        while True:
            item = self._pool.get()
            if item is None:
                return
            buf, view, n = item
            length, op, unique, nodeid, uid, gid, pid, _ext, _pad = header(buf, 0)
            self._serve(view, n, op, unique, nodeid, uid, gid, pid)
            self._give_buffer(buf)

    # ---- one request --------------------------------------------------------
    def _serve(self, view, n, op, unique, nodeid, uid, gid, pid) -> None:
        """Call the handler for one request and answer it exactly once."""
        body = view[40:n]
        if op in _NO_REPLY:
            try:
                if op == P.FORGET:
                    self.fs.forget(((nodeid, P.FORGET_IN.unpack_from(body)[0]),))
                elif op == P.BATCH_FORGET:
                    count = min(P.BATCH_FORGET_IN.unpack_from(body)[0], (len(body) - 8) // 16)
                    self.fs.forget(list(P.FORGET_ONE.iter_unpack(body[8:8 + 16 * count])))
            except Exception as e:  # noqa: BLE001
                log.error("%s failed: %s", P.NAMES[op].upper(), _bug(e))
            return
        handler = self._ops.get(op)
        ctx = Context(uid, gid, pid)
        result = "ok"
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "not served")
            reply, undo = handler(ctx, nodeid, body)
        except OSError as e:
            code = e.errno if e.errno and 0 < e.errno < 4096 else errno.EIO
            if unique & P.UNIQUE_RESEND and self._replayed(op, ctx, nodeid, body, unique, code):
                code = 0
            result = errno.errorcode.get(code, str(code)) if code else "ok (resent)"
            if code:
                self._error(unique, code)
        except Exception as e:  # noqa: BLE001 (a bug must still answer, once)
            log.error("%s failed: %s", P.NAMES.get(op, str(op)).upper(), _bug(e))
            result = "EIO"
            self._error(unique, errno.EIO)
        else:
            try:
                sent = self._reply(unique, reply)
            except Exception as e:  # noqa: BLE001 (a reply that cannot be packed: nothing went)
                log.error("%s failed: %s", P.NAMES.get(op, str(op)).upper(), _bug(e))
                result, sent = "EIO", False
                self._error(unique, errno.EIO)
            if not sent and undo is not None:
                try:
                    undo()
                except Exception as e:  # noqa: BLE001 (answered already: log only)
                    log.error("undoing an unanswered %s failed: %s",
                              P.NAMES.get(op, str(op)).upper(), _bug(e))
            if op == P.LOOKUP and undo is None:
                result = "ENOENT"  # a negative entry
        finally:
            self._request_done()
        if self.debug:
            self._log(op, nodeid, body, ctx, result)

    def _replayed(self, op, ctx, nodeid, body, unique, code) -> bool:
        """A resent request (its server died before answering) that had
        taken effect already: answered as it would have been the first
        time, not with the EEXIST or ENOENT its repetition gives. True if
        so answered."""
        try:
            if code == errno.ENOENT and op in (P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2):
                return self._reply(unique, b"") or True
            if code != errno.EEXIST or op not in (P.CREATE, P.MKDIR, P.MKNOD, P.SYMLINK, P.LINK):
                return False
            name = P.named_args(op, nodeid, body)
            parent, name = (name[1], name[2]) if op in (P.SYMLINK, P.LINK) else name[:2]
            entry = self.fs.made_by(ctx, parent, name)
            if entry is None:  # someone else's: the EEXIST stands
                return False
            if op == P.CREATE:
                flags = P.CREATE_IN.unpack_from(body)[0] & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
                o = self.fs.open(ctx, entry.node_id, flags)
                reply, undo = self._created(entry, o)
            else:
                reply, undo = self._entry_reply(entry)
            if not self._reply(unique, reply) and undo is not None:
                undo()
            return True
        except OSError:
            return False

    def resend(self) -> int:
        """FUSE_NOTIFY_RESEND: the kernel puts every request a server had
        read and not answered back in the queue (Linux 6.9+)."""
        return self._notify(P.NOTIFY_RESEND, [])

    def _reply(self, unique: int, parts) -> bool:
        """Send a reply (a bytes-like or a list of them); False if the
        kernel no longer waits for it."""
        if type(parts) is splice.Pipes:  # a READ's data, waiting in this thread's pipe
            return parts.send(self.fd, unique, self._splicer)
        try:
            if type(parts) is list:
                os.writev(self.fd, [_OUT_HEADER(16 + sum(map(len, parts)), 0, unique), *parts])
            else:
                os.writev(self.fd, (_OUT_HEADER(16 + len(parts), 0, unique), parts))
            return True
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("reply to request %d failed: %s", unique, e.strerror)
            return False

    def _error(self, unique: int, code: int) -> None:
        if not 0 < code < 4096:
            code = errno.EIO
        try:
            os.write(self.fd, P.OUT_HEADER.pack(16, -code, unique))
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("error reply to request %d failed: %s", unique, e.strerror)

    def _log(self, op, nodeid, body, ctx, result) -> None:
        name = P.NAMES.get(op, str(op))
        try:
            shown = self.fs.describe.args(name, P.named_args(op, nodeid, body))
        except Exception:  # noqa: BLE001 (a log line never fails a request)
            shown = "?"
        print(f"shiftfs: {name} {shown} pid {ctx.pid} {self.fs.describe.caller(ctx.uid, ctx.gid)}"
              f" -> {result}", file=sys.stderr, flush=True)

    # ---- INIT ---------------------------------------------------------------
    def _init(self, unique: int, body) -> None:
        try:
            self.granted, reply, shown = negotiate.settle(
                body, self._want_killpriv_v2, self._want_passthrough, self.max_readahead)
        except OSError as e:  # a protocol we do not speak
            self.init_error = e
            self._error(unique, e.errno)
            self._done.set()
            return
        self.expire_only = self.granted.expire_only
        self.can_prune = self.granted.minor >= 45
        self.no_opendir = self.granted.no_opendir
        try:
            self.fs.init(self.granted, self)
        except BaseException as e:  # noqa: B902
            self.init_error = e
            self._error(unique, errno.EIO)
            self._done.set()
            return
        self._reply(unique, reply)
        if self.debug:
            print(f"shiftfs: {shown}", file=sys.stderr, flush=True)
        self.inited.set()

    # ---- names --------------------------------------------------------------
    @staticmethod
    def _entry(e) -> bytes:
        return P.pack_entry(e.node_id, e.st, e.uid, e.gid, e.attr_timeout, e.entry_timeout)

    def _entry_reply(self, e):
        # a created entry the kernel never took is forgotten again
        undo = (lambda: self.fs.forget(((e.node_id, 1),))) if e.node_id else None
        return self._entry(e), undo

    def _lookup(self, ctx, nodeid, body):
        return self._entry_reply(self.fs.lookup(ctx, nodeid, P.name(body)))

    def _mknod(self, ctx, nodeid, body):
        mode, rdev, umask, _ = P.MKNOD_IN.unpack_from(body)
        ctx.umask = umask
        return self._entry_reply(self.fs.mknod(ctx, nodeid, P.name(body[16:]), mode, rdev))

    def _mkdir(self, ctx, nodeid, body):
        mode, umask = P.MKDIR_IN.unpack_from(body)
        ctx.umask = umask
        return self._entry_reply(self.fs.mkdir(ctx, nodeid, P.name(body[8:]), mode))

    def _symlink(self, ctx, nodeid, body):
        name, target = P.names(body, 2)
        return self._entry_reply(self.fs.symlink(ctx, target, nodeid, name))

    def _link(self, ctx, nodeid, body):
        (old,) = P.LINK_IN.unpack_from(body)
        return self._entry_reply(self.fs.link(ctx, old, nodeid, P.name(body[8:])))

    def _unlink(self, ctx, nodeid, body):
        self.fs.unlink(ctx, nodeid, P.name(body))
        return b"", None

    def _rmdir(self, ctx, nodeid, body):
        self.fs.rmdir(ctx, nodeid, P.name(body))
        return b"", None

    def _rename(self, ctx, nodeid, body):
        (newdir,) = P.RENAME_IN.unpack_from(body)
        old, new = P.names(body[8:], 2)
        self.fs.rename(ctx, nodeid, old, newdir, new, 0)
        return b"", None

    def _rename2(self, ctx, nodeid, body):
        newdir, flags, _ = P.RENAME2_IN.unpack_from(body)
        old, new = P.names(body[16:], 2)
        self.fs.rename(ctx, nodeid, old, newdir, new, flags)
        return b"", None

    # ---- attributes ---------------------------------------------------------
    @staticmethod
    def _attr(a) -> bytes:
        return P.pack_attr(a.st, a.uid, a.gid, a.timeout)

    def _getattr(self, ctx, nodeid, body):
        flags, _, fh = P.GETATTR_IN.unpack_from(body)
        fh = self._fd(nodeid, fh) if flags & P.GETATTR_FH else None
        return self._attr(self.fs.getattr(ctx, nodeid, fh)), None

    def _setattr(self, ctx, nodeid, body):
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimensec, mtimensec, _ctn, mode, _u4,
         uid, gid, _u5) = P.SETATTR_IN.unpack_from(body)
        req = SetAttr(valid & ~P.FATTR_FH, mode, uid, gid, size, (atime, atimensec),
                      (mtime, mtimensec))
        fh = self._fd(nodeid, fh) if valid & P.FATTR_FH else None
        return self._attr(self.fs.setattr(ctx, nodeid, req, fh)), None

    def _readlink(self, ctx, nodeid, body):
        return self.fs.readlink(ctx, nodeid), None

    def _statfs(self, ctx, nodeid, body):
        s = self.fs.statfs(ctx, nodeid)
        return P.STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                 s.f_bsize, s.f_namemax, s.f_frsize, 0), None

    # ---- files --------------------------------------------------------------
    @staticmethod
    def _open_out(o: Opened, directory: bool = False) -> bytes:
        flags = 0
        if o.backing_id:  # the kernel refuses KEEP_CACHE with PASSTHROUGH
            flags |= P.FOPEN_PASSTHROUGH
        elif o.keep_cache:
            flags |= (P.FOPEN_CACHE_DIR | P.FOPEN_KEEP_CACHE) if directory else P.FOPEN_KEEP_CACHE
        if o.direct:
            flags |= P.FOPEN_DIRECT_IO
        return P.OPEN_OUT.pack(o.fh, flags, o.backing_id)

    def _open(self, ctx, nodeid, body):
        flags, _ = P.OPEN_IN.unpack_from(body)
        o = self.fs.open(ctx, nodeid, flags)
        return self._open_out(o), lambda: self.fs.release(nodeid, o.fh)

    def _created(self, entry, o):
        def undo():
            self.fs.release(entry.node_id, o.fh)
            self.fs.forget(((entry.node_id, 1),))
        return [self._entry(entry), self._open_out(o)], undo

    def _create(self, ctx, nodeid, body):
        flags, mode, umask, _ = P.CREATE_IN.unpack_from(body)
        ctx.umask = umask
        return self._created(*self.fs.create(ctx, nodeid, P.name(body[16:]), mode, flags))

    def _tmpfile(self, ctx, nodeid, body):
        flags, mode, umask, _ = P.CREATE_IN.unpack_from(body)
        ctx.umask = umask
        return self._created(*self.fs.tmpfile(ctx, nodeid, mode, flags))

    def _read(self, ctx, nodeid, body):
        fh, off, size, _rf, _lo, _fl, _ = P.READ_IN.unpack_from(body)
        return self._splicer.read(self._fd(nodeid, fh), off, min(size, MAX_WRITE)), None

    def _write(self, ctx, nodeid, body):
        fh, off, size, wflags, _lo, flags, _ = P.WRITE_IN.unpack_from(body)
        fh = self._fd(nodeid, fh)
        if wflags & P.WRITE_KILL_SUIDGID:  # set-id bits go before the data (file_remove_privs)
            self.fs.write_kills_suidgid(ctx, nodeid, fh)
        data = body[P.WRITE_IN.size:P.WRITE_IN.size + size]
        # The lower fd never has O_APPEND: a write() on a file the caller
        # has in O_APPEND mode now (flags: its f_flags, fcntl included) is
        # one append to the lower's end; the page cache's write-back of a
        # mapping (WRITE_CACHE, on any fh of the file) goes where it says.
        append = os.RWF_APPEND if flags & os.O_APPEND and not wflags & P.WRITE_CACHE else 0
        done = 0
        while done < size:  # a short write on a local lower: go on, as a kernel write would
            try:
                n = os.pwritev(fh, (data[done:],), off + done, append)
            except OSError:
                if not done:
                    raise
                break  # ENOSPC, EFBIG, EDQUOT past some bytes: say what went, as write(2) does
            if n <= 0:
                break
            done += n
        return P.WRITE_OUT.pack(done, 0), None

    def _release(self, ctx, nodeid, body):
        fh, _fl, _rf, _lo = P.RELEASE_IN.unpack_from(body)
        self.fs.release(nodeid, fh)
        return b"", None

    def _fsync(self, ctx, nodeid, body, directory=False):
        fh, flags, _ = P.FSYNC_IN.unpack_from(body)
        with self._open_fd(ctx, nodeid, fh, directory) as fd:
            self.fs.fsync(fd, flags & P.FSYNC_FDATASYNC)
        return b"", None

    def _fsyncdir(self, ctx, nodeid, body):
        return self._fsync(ctx, nodeid, body, True)

    def _fallocate(self, ctx, nodeid, body):
        fh, off, length, mode, _ = P.FALLOCATE_IN.unpack_from(body)
        self.fs.fallocate(self._fd(nodeid, fh), mode, off, length)
        return b"", None

    def _lseek(self, ctx, nodeid, body):
        fh, off, whence, _ = P.LSEEK_IN.unpack_from(body)
        return P.LSEEK_OUT.pack(os.lseek(self._fd(nodeid, fh), off, whence)), None

    def _copy_file_range(self, ctx, nodeid, body):
        fh_in, off_in, node_out, fh_out, off_out, length, flags = \
            P.COPY_FILE_RANGE_IN.unpack_from(body)
        n = self.fs.copy_file_range(self._fd(nodeid, fh_in), off_in, self._fd(node_out, fh_out),
                                    off_out, length, flags)
        return P.WRITE_OUT.pack(n, 0), None

    def _ioctl(self, ctx, nodeid, body):
        fh, flags, cmd, _arg, in_size, out_size = P.IOCTL_IN.unpack_from(body)
        if flags & P.IOCTL_UNRESTRICTED:
            raise OSError(errno.ENOTTY, "unrestricted ioctl")
        out_size = min(out_size, 1 << 16)  # the kernel's ioctl buffer is at most max_pages
        data = bytes(body[P.IOCTL_IN.size:P.IOCTL_IN.size + in_size])
        with self._open_fd(ctx, nodeid, fh, bool(flags & P.IOCTL_DIR)) as fd:
            result, out = self.fs.ioctl(ctx, nodeid, fd, cmd, data, out_size)
        return [P.IOCTL_OUT.pack(result, 0, 0, 0), out[:out_size]], None

    @contextlib.contextmanager
    def _open_fd(self, ctx, nodeid: int, fh: int, directory: bool):
        """The fd a request on an open file or directory acts on: its fh
        (``_fd``), or, for a directory the kernel opened without the daemon
        (no-opendir mode: fh 0), one opened for this request only."""
        if not (directory and fh == 0 and self.no_opendir):
            yield self._fd(nodeid, fh, directory)
            return
        fd = self.fs.list_open(ctx, nodeid)
        try:
            yield fd
        finally:
            self.fs.list_close(nodeid, fd)

    def _fd(self, nodeid: int, fh: int, directory: bool = False) -> int:
        """A request's fh, used as an fd: only one the daemon handed out
        for an open of this node (a file, or a ``directory``) and has not
        closed, never any other number it holds (EBADF)."""
        if not self.fs.handed_out(nodeid, fh, directory):
            raise OSError(errno.EBADF, f"fh {fh} is no open {'directory' if directory else 'file'}"
                                       f" of node {nodeid}")
        return fh

    def _destroy(self, ctx, nodeid, body):
        return b"", None

    # ---- directories --------------------------------------------------------
    def _opendir(self, ctx, nodeid, body):
        if self.no_opendir:  # the kernel opens directories itself from now on
            raise OSError(errno.ENOSYS, "directories are listed without an open")
        o = self.fs.opendir(ctx, nodeid)
        return self._open_out(o, directory=True), lambda: self.fs.releasedir(nodeid, o.fh)

    def _releasedir(self, ctx, nodeid, body):
        fh, _fl, _rf, _lo = P.RELEASE_IN.unpack_from(body)
        self.fs.releasedir(nodeid, fh)
        return b"", None

    def _readdir(self, ctx, nodeid, body):
        return self._list(ctx, nodeid, body, False)

    def _readdirplus(self, ctx, nodeid, body):
        return self._list(ctx, nodeid, body, True)

    def _list(self, ctx, nodeid, body, plus: bool):
        fh, off, size, _rf, _lo, _fl, _ = P.READ_IN.unpack_from(body)
        if fh == 0 and self.no_opendir:  # no open: the node's stream under way, or a new one
            fh = self.fs.list_open(ctx, nodeid)
            reply = None
            try:
                reply = listing.fill(self.fs, ctx, nodeid, fh, off, min(size, MAX_WRITE), plus)
                return reply
            finally:  # an empty reply ends the kernel's listing
                self.fs.list_close(nodeid, fh, reply is None or not len(reply[0]))
        return listing.fill(self.fs, ctx, nodeid, self._fd(nodeid, fh, True), off,
                            min(size, MAX_WRITE), plus)

    # ---- extended attributes ------------------------------------------------
    @staticmethod
    def _xattr_reply(value: bytes, size: int):
        if size == 0:
            return P.GETXATTR_IN.pack(len(value), 0), None
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr buffer too small")
        return value, None

    def _getxattr(self, ctx, nodeid, body):
        size, _ = P.GETXATTR_IN.unpack_from(body)
        return self._xattr_reply(self.fs.getxattr(ctx, nodeid, P.name(body[8:])), size)

    def _listxattr(self, ctx, nodeid, body):
        size, _ = P.GETXATTR_IN.unpack_from(body)
        return self._xattr_reply(self.fs.listxattr(ctx, nodeid), size)

    def _setxattr(self, ctx, nodeid, body):
        size, flags = P.SETXATTR_IN.unpack_from(body)
        rest = bytes(body[8:])
        end = rest.index(b"\0")
        self.fs.setxattr(ctx, nodeid, rest[:end], rest[end + 1:end + 1 + size], flags)
        return b"", None

    def _removexattr(self, ctx, nodeid, body):
        self.fs.removexattr(ctx, nodeid, P.name(body))
        return b"", None

    # ---- notifications: changes the kernel did not see -----------------------
    def _notify(self, code: int, parts) -> int:
        size = 16 + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [P.OUT_HEADER.pack(size, code, 0), *parts])
            return 0
        except OSError as e:  # ENOENT: the kernel does not hold it
            return -(e.errno or errno.EIO)

    def inval_inode(self, node_id: int, off: int = 0, length: int = 0) -> int:
        return self._notify(P.NOTIFY_INVAL_INODE, [P.NOTIFY_INVAL_INODE_OUT.pack(node_id, off, length)])

    def inval_entry(self, parent_id: int, name: bytes, expire_only: bool = False) -> int:
        """Drop ``name`` from the kernel's cache. ``expire_only`` (where the
        kernel has FUSE_EXPIRE_ONLY) only makes it look the name up again,
        and never detaches a mount on it; otherwise the kernel
        d_invalidate()s the name, which detaches every mount on or below it."""
        flags = P.EXPIRE_ONLY if expire_only and self.expire_only else 0
        return self._notify(P.NOTIFY_INVAL_ENTRY,
                            [P.NOTIFY_INVAL_ENTRY_OUT.pack(parent_id, len(name), flags), name, b"\0"])

    def delete(self, parent_id: int, child_id: int, name: bytes) -> int:
        return self._notify(P.NOTIFY_DELETE,
                            [P.NOTIFY_DELETE_OUT.pack(parent_id, child_id, len(name), 0), name, b"\0"])

    def prune(self, node_ids) -> int:
        """FUSE_NOTIFY_PRUNE: the kernel drops the unused names of these
        nodes (never one something holds, so never a mount point) and then
        FORGETs the nodes nothing else holds (``can_prune``: 7.45)."""
        ids = list(node_ids)
        return self._notify(P.NOTIFY_PRUNE, [P.NOTIFY_PRUNE_OUT.pack(len(ids), 0, 0),
                                             struct.pack(f"={len(ids)}Q", *ids)])

    # ---- passthrough backing files (Linux 6.9, CAP_SYS_ADMIN) ----------------
    def backing_open(self, fd: int) -> int:
        """Register ``fd`` (an open regular file) as a backing file: its
        id, for open replies. The kernel keeps its own reference to the file.
        OSError if refused."""
        # with a mutable buffer fcntl.ioctl returns the call's result
        return fcntl.ioctl(self.fd, P.DEV_IOC_BACKING_OPEN, bytearray(P.BACKING_MAP.pack(fd, 0, 0)))

    def backing_close(self, backing_id: int) -> None:
        fcntl.ioctl(self.fd, P.DEV_IOC_BACKING_CLOSE, bytearray(backing_id.to_bytes(4, sys.byteorder)))


def _bug(e: BaseException) -> str:
    """An unexpected exception in one line: what, and where it was raised."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}".replace("\n", " ")

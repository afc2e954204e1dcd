"""READ replies spliced: the lower file's pages go to /dev/fuse by reference
through two pipes, never through a Python object. Why: a pread of a big
read is a new bytes object (malloc, page faults, one copy out of the page
cache) and its writev a second copy into the kernel's pages; spliced, the
kernel copies once, from the lower's page cache into the FUSE request.

How. The kernel takes a reply from a pipe (fuse_dev_splice_write in
fs/fuse/dev.c) only whole: the 16-byte out header, whose len must equal
the bytes spliced, then the data, all in the pipe at once. The length is
known only once the file is read (a read crossing EOF is short), and
Python has no vmsplice, libfuse's way (it maps the header into the pipe
and patches len after the data went in). So: the data is spliced into
pipe A (until the size or EOF), the header with the real length is written
into pipe B, A spliced after it, and B to /dev/fuse: four calls, no bytes
in user space. The kernel asks for no INIT flag: it offers FUSE_SPLICE_WRITE
(and _MOVE, _READ) in INIT as news (fuse_send_init, fs/fuse/inode.c),
never reads them back, and fuse_dev_splice_write tests nothing negotiated.
No SPLICE_F_MOVE: it would steal the lower's page-cache pages.

Each thread has its own pair, made once, non-blocking (a full pipe is
EAGAIN, never a hang) and sized for the largest read plus the header and
an unaligned first page; where the pipe cannot be that big (an unprivileged
daemon: /proc/sys/fs/pipe-max-size, 1 MiB) bigger reads are pread. A pair
with anything left in it after an error is replaced, never reused, so no
reply carries another's bytes. A lower that refuses splice_read (EINVAL)
is remembered for the connection: its reads are pread from then on.

Reads under ``threshold`` bytes are pread (cheaper there, measured:
docs/performance.md). SHIFTFS_SPLICE=off in the daemon's environment turns
splicing off (for comparisons), a number sets the threshold."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading

from . import protocol as P

log = logging.getLogger("shiftfs")

PAGE = os.sysconf("SC_PAGE_SIZE")
THRESHOLD = 32 << 10  # smallest read spliced: under it pread + writev is cheaper (measured)
BUFFERED = 16 << 10  # reads this big or bigger that are not spliced go through a held buffer
_OUT_HEADER = P.OUT_HEADER.pack


def _setting(value: str | None) -> int | None:
    """SHIFTFS_SPLICE: None (off), or the threshold in bytes."""
    if value is None or value.strip() in ("", "on"):
        return THRESHOLD
    if value.strip() == "off":
        return None
    try:
        return max(1, int(value))
    except ValueError:
        log.warning("SHIFTFS_SPLICE=%s: expected on, off or a size in bytes; splice on", value)
        return THRESHOLD


class Pipes:
    """One thread's pair: A (data) and B (header, then A); after ``fill``,
    ``n`` bytes of the lower file at ``off`` of ``fd`` wait in A."""

    __slots__ = ("a_r", "a_w", "b_r", "b_w", "slots", "n", "fd", "off")

    def __init__(self, want: int) -> None:
        self.a_r, self.a_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.b_r, self.b_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            os.close(self.a_r)
            os.close(self.a_w)
            raise
        # a pipe holds one page, or part of one, per slot: B the header's
        # and then A's, which are the read's pages
        self.slots = min(_grow(self.a_w, want), _grow(self.b_w, want)) // PAGE - 1
        self.n = self.fd = self.off = 0

    def close(self) -> None:
        for fd in (self.a_r, self.a_w, self.b_r, self.b_w):
            os.close(fd)

    def send(self, devfd: int, unique: int, splicer: "Splicer") -> bool:
        """The reply to request ``unique``: header and A's bytes, spliced
        to ``devfd``. False if the kernel no longer waits for it."""
        n, total = self.n, 16 + self.n
        try:
            if os.write(self.b_w, _OUT_HEADER(total, 0, unique)) != 16 or \
                    os.splice(self.a_r, self.b_w, n) != n:
                raise OSError(errno.EAGAIN, "pipe full")
            if os.splice(self.b_r, devfd, total) == total:
                return True
            raise OSError(errno.EIO, "short splice to /dev/fuse")
        except OSError as e:
            splicer.replace(self)
            if e.errno == errno.ENOENT:  # abandoned by the kernel (interrupted)
                return False
            if e.errno == errno.EAGAIN:  # nothing went: the plain way
                data = splicer.pread(self.fd, self.off, n)
                return _writev(devfd, [_OUT_HEADER(16 + len(data), 0, unique), data], unique)
            log.warning("spliced reply to request %d failed: %s", unique, e.strerror)
            return False
        except BaseException:
            splicer.replace(self)
            raise


def _grow(fd: int, want: int) -> int:
    """Pipe ``fd`` made ``want`` bytes big if allowed, else as big as
    allowed; its size."""
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
    except OSError:
        pass
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(want, int(f.read())))
    except (OSError, ValueError):
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def _writev(devfd: int, parts, unique: int) -> bool:
    try:
        os.writev(devfd, parts)
        return True
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("reply to request %d failed: %s", unique, e.strerror)
        return False


class Splicer:
    """READ data for one connection: ``read`` gives bytes (pread) or the
    thread's Pipes with the data in it, which the session sends with
    ``Pipes.send``."""

    def __init__(self, max_read: int, setting: str | None = None) -> None:
        self.threshold = _setting(os.environ.get("SHIFTFS_SPLICE") if setting is None
                                  else setting)
        self._want = max_read + 2 * PAGE
        self._max_read = max_read
        self._local = threading.local()

    def read(self, fd: int, off: int, size: int):
        """``size`` bytes (fewer at EOF) of ``fd`` at ``off``: bytes, or
        the Pipes holding them."""
        if self.threshold is None or size < self.threshold:
            return self.pread(fd, off, size)
        pipes = getattr(self._local, "pipes", None)
        if pipes is None:
            try:
                pipes = self._local.pipes = Pipes(self._want)
            except OSError:  # out of fds (EMFILE): this read the plain way, the next tries again
                return self.pread(fd, off, size)
        if (off % PAGE + size + PAGE - 1) // PAGE > pipes.slots:  # not in one pipe
            return self.pread(fd, off, size)
        got = 0
        try:
            while got < size:
                n = os.splice(fd, pipes.a_w, size - got, offset_src=off + got)
                if n == 0:  # end of file
                    break
                got += n
        except OSError as e:
            if got:  # some came: a short read, as pread gives
                pass
            elif e.errno == errno.EINVAL:  # no splice_read on this lower
                log.info("the lower refuses splice (%s): reads go through pread", e.strerror)
                self.threshold = None
                return self.pread(fd, off, size)
            elif e.errno == errno.EAGAIN:  # cannot happen (A holds the largest read)
                self.replace(pipes)
                return self.pread(fd, off, size)
            else:
                raise
        except BaseException:
            self.replace(pipes)
            raise
        if not got:
            return b""
        pipes.n, pipes.fd, pipes.off = got, fd, off
        return pipes

    def pread(self, fd: int, off: int, size: int):
        """The plain way: a read of ``size`` bytes or more into this
        thread's buffer (sent before the thread reads again), not into a
        new bytes object each time: one of 1 MiB is an mmap, 256 page
        faults and an munmap a read, which cost 4-10 x the CPU of the
        read itself on a cached lower (bench/splice.py)."""
        if size < BUFFERED:
            return os.pread(fd, size, off)
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self._max_read))
        return buf[:os.preadv(fd, (buf[:size],), off)]

    def replace(self, pipes: Pipes) -> None:
        """Close a pair that may hold bytes; the thread makes a new one at
        its next read."""
        if getattr(self._local, "pipes", None) is pipes:
            self._local.pipes = None
        pipes.close()

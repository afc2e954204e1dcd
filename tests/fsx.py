"""An fsx-style checker: random reads, writes, truncates, appends, hole
punches and mmap reads and writes on one file, each checked against a
reference copy kept in memory (after fsx, the file system exerciser of
BSD and xfstests). Seeded, so a failure names the seed and the last
operations, and runs again the same way.

Every operation is followed by an fstat of the file (its size must be the
reference's); every read, through the fd or a shared mapping, is compared
byte for byte; and at each fsync, and at the end, the file as the lower
holds it (``lower``, read directly) must equal the reference too.

Two fds are open on the file: ``fd`` (O_RDWR) and ``afd`` (O_RDWR|O_APPEND,
whose writes go to the end whatever the offset), and the mappings use
either, as programs do (a log opened "a+" and mapped to be read); the
O_APPEND fd only where the kernel lets a FUSE daemon's direct-I/O files be
mapped shared (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6: a daemon-served
O_APPEND open is direct I/O, so that each write() is one append)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random

PAGE = mmap.PAGESIZE
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

OPS = ("write", "write", "read", "read", "truncate", "mapwrite", "mapread", "append", "punch",
       "fsync", "reopen")


class Mismatch(AssertionError):
    pass


def map_append_fd() -> bool:
    """Whether this kernel maps a FUSE direct-I/O file shared (6.6+)."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 6)


def run(path, seed: int, ops: int = 2000, max_size: int = 256 << 10, max_len: int = 64 << 10,
        lower=None, map_append: bool = True) -> int:
    """``ops`` random operations on the file ``path`` (made anew); the
    file's final size. Mismatch names the seed, the operation and the last
    few before it."""
    rnd = random.Random(seed)
    ref = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    afd = os.open(path, os.O_RDWR | os.O_APPEND)
    done: list[tuple] = []
    i = 0

    def fail(msg):
        raise Mismatch(f"seed {seed}, op {i} {done[-1:] or ''}: {msg}; before it: {done[-9:-1]}")

    def check(off, data, want):
        if data != want:
            k = next(k for k in range(len(data) + 1)
                     if k >= len(data) or k >= len(want) or data[k] != want[k])
            fail(f"read of [{off}, +{len(want)}) differs at {off + k} "
                 f"(got {len(data)} bytes, want {len(want)})")

    def lower_equal(when):
        if lower is not None:
            with open(lower, "rb") as f:
                got = f.read()
            if got != ref:
                fail(f"the lower's file differs {when} ({len(got)} bytes, want {len(ref)})")

    def grow(size):
        if size > len(ref):
            ref.extend(bytes(size - len(ref)))

    try:
        for i in range(ops):
            op = rnd.choice(OPS)
            off = rnd.randrange(max_size)
            n = rnd.randrange(1, max_len)
            done.append((op, off, n))
            if op == "write":
                n = min(n, max_size - off)
                data = rnd.randbytes(n)
                if os.pwrite(fd, data, off) != n:
                    fail("short write")
                grow(off)
                ref[off:off + n] = data
            elif op == "read":
                check(off, os.pread(fd, n, off), bytes(ref[off:off + n]))
            elif op == "truncate":
                size = rnd.randrange(max_size)
                os.ftruncate(fd, size)
                del ref[size:]
                grow(size)
            elif op == "mapwrite":
                n = min(n, max_size - off)
                if off + n > len(ref):  # a mapping cannot grow a file: grow it first, as fsx does
                    os.ftruncate(fd, off + n)
                    grow(off + n)
                start = off - off % PAGE
                via = afd if rnd.random() < 0.5 and map_append else fd
                with mmap.mmap(via, off + n - start, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as m:
                    data = rnd.randbytes(n)
                    m[off - start:off - start + n] = data
                    if rnd.random() < 0.5:
                        m.flush()
                ref[off:off + n] = data
            elif op == "mapread":
                if not ref:
                    continue
                off = rnd.randrange(len(ref))
                n = min(n, len(ref) - off)
                start = off - off % PAGE
                via = afd if rnd.random() < 0.5 and map_append else fd
                with mmap.mmap(via, off + n - start, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=start) as m:
                    check(off, bytes(m[off - start:off - start + n]), bytes(ref[off:off + n]))
            elif op == "append":
                data = rnd.randbytes(min(n, max(1, max_size - len(ref))))
                if os.write(afd, data) != len(data):
                    fail("short append")
                ref.extend(data)
            elif op == "punch":
                if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, n):
                    e = ctypes.get_errno()
                    if e != errno.EOPNOTSUPP:
                        fail(f"punching a hole: {os.strerror(e)}")
                    continue
                end = min(off + n, len(ref))
                if off < end:
                    ref[off:end] = bytes(end - off)
            elif op == "fsync":
                os.fsync(fd)
                lower_equal("after fsync")
            elif op == "reopen":
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            if size != len(ref):
                fail(f"size {size}, want {len(ref)}")
        os.fsync(fd)
        check(0, os.pread(fd, len(ref) + 1, 0), bytes(ref))
        lower_equal("at the end")
    finally:
        os.close(fd)
        os.close(afd)
    return len(ref)

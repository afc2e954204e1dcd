"""INIT: what the daemon asks of the kernel and what the two settle on, in
one place. Pure: the session (session.py) reads the request and sends the
reply; the supervisor's journal keeps the result for the next server.

Asked for always: async reads, big writes, POSIX ACLs (the kernel checks
them, with the daemon's answers cached), no umask applied by the kernel
(the daemon gives new entries the caller's umask itself), readdirplus (auto),
parallel directory operations, cached symlinks, page cache dropped when
the lower's size or mtime changes (AUTO_INVAL_DATA), 1 MiB requests,
directory ioctls, EXPIRE_ONLY invalidations (Linux 6.2), mmap of
direct-I/O opens. Asked for where the daemon can use them:
HANDLE_KILLPRIV_V2 (root: set-id bits cleared by the daemon) and
PASSTHROUGH (root: backing files). RESEND (6.9) and PRUNE (7.45) need no
flag; they are noted from what the kernel offers. Where the kernel offers
NO_OPENDIR_SUPPORT (Linux 5.1) the daemon answers OPENDIR with ENOSYS:
from then on the kernel opens and releases directories without asking,
keeps every listing (FOPEN_CACHE_DIR) until the directory changes, and
READDIR comes with fh 0.

Spliced READ replies (splice.py) need no flag either: the kernel offers
FUSE_SPLICE_WRITE, _MOVE and _READ in every INIT (fuse_send_init,
fs/fuse/inode.c) to say what its device can do, never reads them back
from the reply, and fuse_dev_splice_write (fs/fuse/dev.c) tests nothing
negotiated; in libfuse they are capabilities of the library alone."""

from __future__ import annotations

import errno

from . import protocol as P
from .filesystem import Granted

MAX_WRITE = 1 << 20  # bytes in one WRITE (max_pages 256)
_ALWAYS = (P.ASYNC_READ | P.BIG_WRITES | P.POSIX_ACL | P.DONT_MASK | P.DO_READDIRPLUS
           | P.READDIRPLUS_AUTO | P.PARALLEL_DIROPS | P.CACHE_SYMLINKS | P.AUTO_INVAL_DATA
           | P.MAX_PAGES | P.HAS_IOCTL_DIR | P.INIT_EXT | P.HAS_EXPIRE_ONLY
           | P.DIRECT_IO_ALLOW_MMAP)
_NAMES = ("ASYNC_READ", "BIG_WRITES", "POSIX_ACL", "DONT_MASK", "DO_READDIRPLUS",
          "READDIRPLUS_AUTO", "PARALLEL_DIROPS", "CACHE_SYMLINKS", "AUTO_INVAL_DATA",
          "MAX_PAGES", "HAS_IOCTL_DIR", "HANDLE_KILLPRIV_V2", "PASSTHROUGH",
          "HAS_EXPIRE_ONLY")


def settle(body, killpriv_v2: bool, passthrough: bool,
           max_readahead: int) -> tuple[Granted, bytes, str]:
    """The INIT request ``body`` answered: (what was granted, the reply,
    a line for the -d log). OSError(EPROTO) for a protocol we do not speak."""
    raw = bytes(body[:P.INIT_IN.size]).ljust(P.INIT_IN.size, b"\0")
    major, minor, kernel_readahead, flags, flags2 = P.INIT_IN.unpack(raw)
    if major != P.KERNEL_MAJOR or minor < P.MIN_MINOR:
        raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} not spoken")
    offered = flags | (flags2 << 32 if flags & P.INIT_EXT else 0)
    want = _ALWAYS | (P.HANDLE_KILLPRIV_V2 if killpriv_v2 else 0) | (
        P.PASSTHROUGH if passthrough else 0)
    got = want & offered
    minor = min(minor, P.KERNEL_MINOR)
    granted = Granted(minor=minor, passthrough=bool(got & P.PASSTHROUGH),
                      killpriv_v2=bool(got & P.HANDLE_KILLPRIV_V2),
                      expire_only=bool(got & P.HAS_EXPIRE_ONLY) or (
                          minor >= 38 and bool(offered & P.HAS_EXPIRE_ONLY)),
                      max_write=MAX_WRITE, resend=bool(offered & P.HAS_RESEND),
                      no_opendir=bool(offered & P.NO_OPENDIR_SUPPORT))
    reply = P.INIT_OUT.pack(
        P.KERNEL_MAJOR, minor, min(kernel_readahead, max_readahead), got & 0xFFFFFFFF,
        16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0, got >> 32,
        P.MAX_STACK_DEPTH if got & P.PASSTHROUGH else 0, 0)
    shown = ", ".join(n.lower() for n in _NAMES if got & getattr(P, n)) or "nothing"
    if granted.resend:
        shown += ", has_resend"
    if granted.no_opendir:
        shown += ", no_opendir"
    return granted, reply, f"INIT: protocol 7.{minor}, max_write {MAX_WRITE}, granted {shown}"

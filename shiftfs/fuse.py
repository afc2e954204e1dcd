"""libfuse 3's low-level (inode) API through ctypes: the session, the
request loop, the replies and the notify calls. The only module that
touches libfuse; it imports nothing of ours.

mfusepy finds and loads libfuse **3** (forced: it prefers libfuse 2 when
bindfs installed it) and knows the layouts of ``struct stat``,
``fuse_file_info`` and ``fuse_conn_info`` for 3.14 to 3.17; the structs
only the low-level API has (``fuse_lowlevel_ops``, ``fuse_entry_param``,
``fuse_ctx``, ``fuse_buf``) are defined here, per libfuse version where
they differ, and their sizes are checked against the installed C header by
tests/test_fuse_layout.py.

The handlers object (ops.Operations) gets plain Python values and returns
plain Python values; the wrappers here reply. Every request is answered
exactly once: a handler that raises OSError is answered with its errno, any
other exception with EIO and a log line (a bug never hangs a caller).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import platform
import signal
import struct
import sys
import threading

if not os.environ.get("FUSE_LIBRARY_PATH"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

try:
    import mfusepy
except (OSError, EnvironmentError) as _e:  # libfuse3 missing
    raise ImportError(f"libfuse3 not found ({_e}); install the fuse3 package") from None

if mfusepy.fuse_version_major != 3:
    raise ImportError(
        f"shiftfs needs libfuse 3, but mfusepy loaded {mfusepy._libfuse_path} "
        f"(version {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor})")

log = logging.getLogger("shiftfs")
LIBFUSE_PATH = mfusepy._libfuse_path
LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)

_libc = ctypes.CDLL(None, use_errno=True)
_lib = mfusepy._libfuse

# fuse_common.h capability bits
FUSE_CAP_ASYNC_READ = 1 << 0
FUSE_CAP_POSIX_LOCKS = 1 << 1
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_EXPORT_SUPPORT = 1 << 4
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_CAP_SPLICE_READ = 1 << 9
FUSE_CAP_FLOCK_LOCKS = 1 << 10
FUSE_CAP_IOCTL_DIR = 1 << 11
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_ASYNC_DIO = 1 << 15
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_NO_OPEN_SUPPORT = 1 << 17
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_HANDLE_KILLPRIV = 1 << 20
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
FUSE_CAP_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_CAP_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_CAP_PASSTHROUGH = 1 << 29  # libfuse 3.17 (in 3.14 the bit means nothing)
# libfuse 3.17 only; 3.14 has no such bit (and 1 << 21 means nothing there)
FUSE_CAP_HANDLE_KILLPRIV_V2 = 1 << 21

# The kernel's side of FUSE_HANDLE_KILLPRIV_V2 (include/uapi/linux/fuse.h):
# the INIT flag, and the bits that then ask the daemon to clear set-uid and
# set-gid: in fuse_write_in.write_flags and fuse_setattr_in.valid (the one
# in fuse_open_in never comes: without ATOMIC_O_TRUNC an O_TRUNC open is a
# truncating SETATTR). libfuse 3.14 and 3.17 pass neither to the handlers,
# so the request loop reads them from the raw request (Session._worker).
FUSE_INIT_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FATTR_KILL_SUIDGID = 1 << 11
_OP_SETATTR, _OP_WRITE, _OP_INIT = 4, 16, 26

# FUSE_SET_ATTR_* (fuse_lowlevel.h): which fields a SETATTR carries
SET_ATTR_MODE = 1 << 0
SET_ATTR_UID = 1 << 1
SET_ATTR_GID = 1 << 2
SET_ATTR_SIZE = 1 << 3
SET_ATTR_ATIME = 1 << 4
SET_ATTR_MTIME = 1 << 5
SET_ATTR_ATIME_NOW = 1 << 7
SET_ATTR_MTIME_NOW = 1 << 8
SET_ATTR_CTIME = 1 << 10
# not libfuse's: FATTR_KILL_SUIDGID from the raw request, or-ed in by _ll_setattr
SET_ATTR_KILL_SUIDGID = 1 << 11

FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2

c_stat = mfusepy.c_stat
c_statvfs = mfusepy.c_statvfs
FileInfo = mfusepy.fuse_file_info
ConnInfo = mfusepy.fuse_conn_info
_NEW_LAYOUT = LIBFUSE_VERSION >= (3, 17)  # struct fuse_buf gained mem_size
# FUSE passthrough: libfuse 3.17 sends FUSE_PASSTHROUGH at INIT and puts
# fuse_file_info.backing_id (int32 at byte 36, after poll_events; mfusepy's
# struct stops before it) into the open reply with FOPEN_PASSTHROUGH.
HAS_PASSTHROUGH = _NEW_LAYOUT
FI_BACKING_ID_OFFSET = 36
# the kernel's ioctls on /dev/fuse for backing files (Linux 6.9):
# _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
FUSE_DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2


class Ctx(ctypes.Structure):
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("pid", ctypes.c_int32), ("umask", ctypes.c_uint32)]


class EntryParam(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("generation", ctypes.c_uint64),
                ("attr", c_stat), ("attr_timeout", ctypes.c_double),
                ("entry_timeout", ctypes.c_double)]


class ForgetData(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]


class Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


class FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)] + (
                    [("mem_size", ctypes.c_size_t)] if _NEW_LAYOUT else [])


class FuseBufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", FuseBuf * 1)]


# sizes the C headers give (gcc, x86_64 and aarch64), checked by the tests
LAYOUT_SIZES = {
    "fuse_buf": 48 if _NEW_LAYOUT else 40,
    "fuse_bufvec": 72 if _NEW_LAYOUT else 64,
    "fuse_entry_param": 176 if platform.machine() == "x86_64" else 160,
    "fuse_ctx": 16,
    "fuse_forget_data": 16,
    "fuse_args": 24,
    "fuse_file_info": 64 if _NEW_LAYOUT else 40,  # only ever through libfuse's pointer
}

_req = ctypes.c_void_p
_ino = ctypes.c_uint64
_fi = ctypes.POINTER(FileInfo)
_name = ctypes.c_char_p
_off = ctypes.c_int64
_size = ctypes.c_size_t
_F = ctypes.CFUNCTYPE

# fuse_lowlevel_ops, in header order; None marks a slot we leave NULL
_OPS = [
    ("init", _F(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))),
    ("destroy", _F(None, ctypes.c_void_p)),
    ("lookup", _F(None, _req, _ino, _name)),
    ("forget", _F(None, _req, _ino, ctypes.c_uint64)),
    ("getattr", _F(None, _req, _ino, _fi)),
    ("setattr", _F(None, _req, _ino, ctypes.POINTER(c_stat), ctypes.c_int, _fi)),
    ("readlink", _F(None, _req, _ino)),
    ("mknod", _F(None, _req, _ino, _name, ctypes.c_uint32, ctypes.c_uint64)),
    ("mkdir", _F(None, _req, _ino, _name, ctypes.c_uint32)),
    ("unlink", _F(None, _req, _ino, _name)),
    ("rmdir", _F(None, _req, _ino, _name)),
    ("symlink", _F(None, _req, _name, _ino, _name)),
    ("rename", _F(None, _req, _ino, _name, _ino, _name, ctypes.c_uint)),
    ("link", _F(None, _req, _ino, _ino, _name)),
    ("open", _F(None, _req, _ino, _fi)),
    ("read", _F(None, _req, _ino, _size, _off, _fi)),
    ("write", _F(None, _req, _ino, ctypes.c_void_p, _size, _off, _fi)),
    ("flush", _F(None, _req, _ino, _fi)),
    ("release", _F(None, _req, _ino, _fi)),
    ("fsync", _F(None, _req, _ino, ctypes.c_int, _fi)),
    ("opendir", _F(None, _req, _ino, _fi)),
    ("readdir", _F(None, _req, _ino, _size, _off, _fi)),
    ("releasedir", _F(None, _req, _ino, _fi)),
    ("fsyncdir", _F(None, _req, _ino, ctypes.c_int, _fi)),
    ("statfs", _F(None, _req, _ino)),
    ("setxattr", _F(None, _req, _ino, _name, ctypes.c_void_p, _size, ctypes.c_int)),
    ("getxattr", _F(None, _req, _ino, _name, _size)),
    ("listxattr", _F(None, _req, _ino, _size)),
    ("removexattr", _F(None, _req, _ino, _name)),
    ("access", _F(None, _req, _ino, ctypes.c_int)),
    ("create", _F(None, _req, _ino, _name, ctypes.c_uint32, _fi)),
    ("getlk", ctypes.c_void_p),
    ("setlk", ctypes.c_void_p),
    ("bmap", ctypes.c_void_p),
    ("ioctl", ctypes.c_void_p),
    ("poll", ctypes.c_void_p),
    ("write_buf", _F(None, _req, _ino, ctypes.POINTER(FuseBufvec), _off, _fi)),
    ("retrieve_reply", ctypes.c_void_p),
    ("forget_multi", _F(None, _req, _size, ctypes.POINTER(ForgetData))),
    ("flock", ctypes.c_void_p),
    ("fallocate", _F(None, _req, _ino, ctypes.c_int, _off, _off, _fi)),
    ("readdirplus", _F(None, _req, _ino, _size, _off, _fi)),
    ("copy_file_range", _F(None, _req, _ino, _off, _fi, _ino, _off, _fi, _size, ctypes.c_int)),
    ("lseek", _F(None, _req, _ino, _off, ctypes.c_int, _fi)),
]


# struct fuse_custom_io: 3.17 added clone_fd, and versioned the call
# (fuse_session_custom_io_317 takes the struct's size); only 3.14 uses it here
_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_void_p)


class CustomIo(ctypes.Structure):
    _fields_ = [("writev", ctypes.c_void_p), ("read", ctypes.c_void_p),
                ("splice_receive", ctypes.c_void_p), ("splice_send", ctypes.c_void_p)] + (
                    [("clone_fd", ctypes.c_void_p)] if LIBFUSE_VERSION >= (3, 17) else [])


class LowlevelOps(ctypes.Structure):
    _fields_ = [(name, kind) for name, kind in _OPS]


def _sig(fn, restype, *argtypes):
    fn.restype, fn.argtypes = restype, list(argtypes)


_vp = ctypes.c_void_p
_sig(_lib.fuse_session_new, _vp, ctypes.POINTER(Args), ctypes.POINTER(LowlevelOps), _size, _vp)
_sig(_lib.fuse_session_mount, ctypes.c_int, _vp, ctypes.c_char_p)
if LIBFUSE_VERSION < (3, 17):
    _sig(_lib.fuse_session_custom_io, ctypes.c_int, _vp, ctypes.POINTER(CustomIo), ctypes.c_int)
_sig(_lib.fuse_session_unmount, None, _vp)
_sig(_lib.fuse_session_destroy, None, _vp)
_sig(_lib.fuse_session_exit, None, _vp)
_sig(_lib.fuse_session_exited, ctypes.c_int, _vp)
_sig(_lib.fuse_session_fd, ctypes.c_int, _vp)
_sig(_lib.fuse_session_receive_buf, ctypes.c_int, _vp, ctypes.POINTER(FuseBuf))
_sig(_lib.fuse_session_process_buf, None, _vp, ctypes.POINTER(FuseBuf))
_sig(_lib.fuse_req_ctx, ctypes.POINTER(Ctx), _req)
_sig(_lib.fuse_req_getgroups, ctypes.c_int, _req, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32))
_sig(_lib.fuse_reply_err, ctypes.c_int, _req, ctypes.c_int)
_sig(_lib.fuse_reply_none, None, _req)
_sig(_lib.fuse_reply_entry, ctypes.c_int, _req, ctypes.POINTER(EntryParam))
_sig(_lib.fuse_reply_create, ctypes.c_int, _req, ctypes.POINTER(EntryParam), _fi)
_sig(_lib.fuse_reply_attr, ctypes.c_int, _req, ctypes.POINTER(c_stat), ctypes.c_double)
_sig(_lib.fuse_reply_readlink, ctypes.c_int, _req, ctypes.c_char_p)
_sig(_lib.fuse_reply_open, ctypes.c_int, _req, _fi)
_sig(_lib.fuse_reply_write, ctypes.c_int, _req, _size)
_sig(_lib.fuse_reply_buf, ctypes.c_int, _req, ctypes.c_void_p, _size)
_sig(_lib.fuse_reply_data, ctypes.c_int, _req, ctypes.POINTER(FuseBufvec), ctypes.c_int)
_sig(_lib.fuse_reply_statfs, ctypes.c_int, _req, ctypes.POINTER(c_statvfs))
_sig(_lib.fuse_reply_xattr, ctypes.c_int, _req, _size)
_sig(_lib.fuse_reply_lseek, ctypes.c_int, _req, _off)
_sig(_lib.fuse_add_direntry, _size, _req, ctypes.c_void_p, _size, ctypes.c_char_p,
     ctypes.POINTER(c_stat), _off)
_sig(_lib.fuse_add_direntry_plus, _size, _req, ctypes.c_void_p, _size, ctypes.c_char_p,
     ctypes.POINTER(EntryParam), _off)
_sig(_lib.fuse_buf_copy, ctypes.c_ssize_t, ctypes.POINTER(FuseBufvec), ctypes.POINTER(FuseBufvec),
     ctypes.c_int)
_sig(_lib.fuse_buf_size, _size, ctypes.POINTER(FuseBufvec))
_sig(_lib.fuse_set_signal_handlers, ctypes.c_int, _vp)
_sig(_lib.fuse_remove_signal_handlers, None, _vp)
_libc.free.argtypes = [ctypes.c_void_p]
# libc's own read and writev for fuse_custom_io (the extra userdata argument
# is ignored by the calling convention); without use_errno, so that errno
# stays what writev set for libfuse to read
_plain_libc = ctypes.CDLL(None)
_sig(_plain_libc.writev, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_LIBC_READ = ctypes.cast(_plain_libc.read, ctypes.c_void_p).value
_LIBC_WRITEV = ctypes.cast(_plain_libc.writev, ctypes.c_void_p).value


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


# ---- struct stat ------------------------------------------------------------------

if platform.machine() == "x86_64":
    _STAT_FMT = "QQQIIIiQqqqqqqqqq24x"
    _STAT = struct.Struct(_STAT_FMT)
    _ENTRY = struct.Struct("QQ" + _STAT_FMT + "dd")

    def pack_stat(obj, st: os.stat_result, uid: int, gid: int) -> None:
        a, an = divmod(st.st_atime_ns, 1000000000)
        m, mn = divmod(st.st_mtime_ns, 1000000000)
        c, cn = divmod(st.st_ctime_ns, 1000000000)
        _STAT.pack_into(obj, 0, st.st_dev, st.st_ino, st.st_nlink, st.st_mode, uid, gid, 0,
                        st.st_rdev, st.st_size, st.st_blksize, st.st_blocks, a, an, m, mn, c, cn)

    def pack_entry(obj, node_id: int, st: os.stat_result, uid: int, gid: int,
                   attr_timeout: float, entry_timeout: float) -> None:
        a, an = divmod(st.st_atime_ns, 1000000000)
        m, mn = divmod(st.st_mtime_ns, 1000000000)
        c, cn = divmod(st.st_ctime_ns, 1000000000)
        _ENTRY.pack_into(obj, 0, node_id, 0, st.st_dev, st.st_ino, st.st_nlink, st.st_mode, uid,
                         gid, 0, st.st_rdev, st.st_size, st.st_blksize, st.st_blocks, a, an, m, mn,
                         c, cn, attr_timeout, entry_timeout)
else:
    def pack_stat(obj, st: os.stat_result, uid: int, gid: int) -> None:
        ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))
        obj.st_dev, obj.st_ino, obj.st_nlink, obj.st_mode = st.st_dev, st.st_ino, st.st_nlink, st.st_mode
        obj.st_uid, obj.st_gid, obj.st_rdev, obj.st_size = uid, gid, st.st_rdev, st.st_size
        obj.st_blksize, obj.st_blocks = st.st_blksize, st.st_blocks
        for name, ns in (("st_atimespec", st.st_atime_ns), ("st_mtimespec", st.st_mtime_ns),
                         ("st_ctimespec", st.st_ctime_ns)):
            t = getattr(obj, name)
            t.tv_sec, t.tv_nsec = divmod(ns, 1000000000)

    def pack_entry(obj, node_id, st, uid, gid, attr_timeout, entry_timeout) -> None:
        obj.ino, obj.generation = node_id, 0
        pack_stat(obj.attr, st, uid, gid)
        obj.attr_timeout, obj.entry_timeout = attr_timeout, entry_timeout


def unpack_times(attr: c_stat) -> tuple[tuple[int, int], tuple[int, int]]:
    """(atime, mtime) as (sec, nsec) from a SETATTR's struct stat."""
    a, m = attr.st_atimespec, attr.st_mtimespec
    return (a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec)


# ---- the request being served ------------------------------------------------------

class _Local(threading.local):
    kill = 0  # the kill bit of the WRITE or SETATTR being served (see Session._worker)


_tls = _Local()


def caller() -> tuple[int, int, int, int]:
    """(uid, gid, pid, umask) of the request this thread is serving."""
    c = _lib.fuse_req_ctx(_tls.req).contents
    return c.uid, c.gid, c.pid, c.umask


def caller_groups() -> list[int]:
    buf = (ctypes.c_uint32 * 256)()
    n = _lib.fuse_req_getgroups(_tls.req, 256, buf)
    return list(buf[:min(n, 256)]) if n > 0 else []


# ---- the results a handler may return ----------------------------------------------

class Entry:
    """A LOOKUP-like answer: node 0 is a negative entry (cached for
    ``entry_timeout``), any other counts as one lookup of that node."""

    __slots__ = ("node_id", "st", "uid", "gid", "attr_timeout", "entry_timeout")

    def __init__(self, node_id, st, uid, gid, attr_timeout, entry_timeout):
        self.node_id, self.st, self.uid, self.gid = node_id, st, uid, gid
        self.attr_timeout, self.entry_timeout = attr_timeout, entry_timeout


_DIRENT_BASE = 24    # struct fuse_dirent without the name
_DIRENTPLUS_BASE = 128 + 24  # struct fuse_entry_out in front of it


def _dirent_size(namelen: int, plus: bool) -> int:
    return (namelen + (_DIRENTPLUS_BASE if plus else _DIRENT_BASE) + 7) & ~7


# ---- the session -------------------------------------------------------------------

class Session:
    """One low-level session: ``ops`` (ops.Operations) serves the requests.

    ``mount_options`` are the -o words libfuse and the kernel take
    (allow_other, default_permissions, fsname=, ro, nosuid, ...);
    ``conn_want``/``conn_unwant`` the capability bits asked for and refused
    at INIT; with ``debug`` one line per request goes to stderr.
    """

    def __init__(self, ops, mount_options: list[str], conn_want: int, conn_unwant: int,
                 max_readahead: int = 0, debug: bool = False, killpriv_v2: bool = False) -> None:
        self.ops = ops
        if killpriv_v2 and LIBFUSE_VERSION >= (3, 17):
            conn_want |= FUSE_CAP_HANDLE_KILLPRIV_V2
        self.conn_want, self.conn_unwant = conn_want, conn_unwant
        # asked for; on 3.14 granted by patching the INIT reply (use_fd)
        self._want_v2 = killpriv_v2
        self.killpriv_v2 = False  # negotiated (known once INIT is answered)
        self._init_unique = None
        self._io = None
        self.max_readahead = max_readahead
        self.init_error: BaseException | None = None
        self._debug = debug
        self._callbacks = []  # kept alive as long as the session
        self._writev_cb = _WRITEV(self._writev)
        self._ll_ops = LowlevelOps()
        for name, kind in _OPS:
            handler = getattr(self, "_ll_" + name, None)
            if handler is not None and kind is not ctypes.c_void_p:
                if debug and name not in ("init", "destroy"):
                    handler = self._debugged(name, handler)
                cb = kind(handler)
                self._callbacks.append(cb)
                setattr(self._ll_ops, name, cb)
        words = [b"shiftfs"] + [w for opt in mount_options for w in (b"-o", opt.encode())]
        self._argv = (ctypes.c_char_p * (len(words) + 1))(*words, None)
        self._args = Args(len(words), self._argv, 0)
        self.se = _lib.fuse_session_new(ctypes.byref(self._args), ctypes.byref(self._ll_ops),
                                        ctypes.sizeof(self._ll_ops), None)
        if not self.se:
            raise OSError(errno.EINVAL, "libfuse refused the mount options")
        self._threads: list[threading.Thread] = []
        self._done = threading.Event()
        self._old_signals: dict | None = None

    # ---- lifecycle ----
    def mount(self, mountpoint: str) -> None:
        if _lib.fuse_session_mount(self.se, mountpoint.encode()) != 0:
            raise OSError(errno.EIO, f"mount of {mountpoint} failed")

    def use_fd(self, fd: int) -> None:
        """Serve the /dev/fuse ``fd`` we opened (and mount ourselves).

        libfuse 3.14 knows no FUSE_HANDLE_KILLPRIV_V2, so when it is asked
        for, the session's replies go through our writev (libfuse's custom
        io) until INIT is answered: it sets the flag in the INIT reply when
        the kernel offered it, then hands writev back to libc's (the INIT
        reply is the only one it touches). libfuse 3.17 negotiates the flag
        itself (conn->want), and takes the fd as /dev/fd/N."""
        if not (self._want_v2 and LIBFUSE_VERSION < (3, 17)):
            self.mount(f"/dev/fd/{fd}")
            return
        io = CustomIo()
        io.writev = ctypes.cast(self._writev_cb, ctypes.c_void_p).value
        io.read = _LIBC_READ
        if _lib.fuse_session_custom_io(self.se, ctypes.byref(io), fd) != 0:
            raise OSError(errno.EIO, "libfuse refused the /dev/fuse fd")
        self._io = io

    def _note_init(self, words) -> None:
        """The INIT request (in the worker loop): remember it, so that our
        writev knows its reply, and whether the kernel offers v2."""
        self._init_unique = (words[2] | words[3] << 32, bool(words[13] & FUSE_INIT_HANDLE_KILLPRIV_V2))

    def _writev(self, fd, iov, count, userdata) -> int:
        try:
            note = self._init_unique
            if note is not None and count >= 2:
                vec = (_Iovec * count).from_address(iov)
                unique = ctypes.c_uint64.from_address(vec[0].base + 8).value
                if unique == note[0] and vec[1].len >= 16:
                    self._init_unique = None
                    if note[1] and ctypes.c_int32.from_address(vec[0].base + 4).value == 0:
                        flags = ctypes.c_uint32.from_address(vec[1].base + 12)
                        flags.value |= FUSE_INIT_HANDLE_KILLPRIV_V2
                        self.killpriv_v2 = True
                    self._restore_writev()
        except BaseException:  # noqa: B902 (the reply goes out all the same)
            log.exception("INIT reply not inspected")
        return _plain_libc.writev(fd, iov, count)

    def _restore_writev(self) -> None:
        """libfuse copied our fuse_custom_io into se->io (struct
        fuse_session: char *mountpoint; int exited or padding; int fd; then
        the io pointer, at byte 16 in 3.14 and 3.17); from now on its writev
        is libc's own, so no reply passes through Python. Touched only if it
        holds exactly what we gave."""
        io_ptr = ctypes.c_void_p.from_address(self.se + 16).value
        if not io_ptr:
            return
        theirs = CustomIo.from_address(io_ptr)
        if theirs.read == _LIBC_READ and theirs.writev == self._io.writev:
            theirs.writev = _LIBC_WRITEV

    def start(self, workers: int) -> None:
        """Start the worker threads (they read requests from now on)."""
        for i in range(max(1, workers)):
            t = threading.Thread(target=self._worker, name=f"shiftfs-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def catch_signals(self) -> None:
        """From now on SIGTERM/SIGINT/SIGHUP end the session (wait() then
        unmounts): called before the mount goes live, so that a signal sent
        as soon as it is never finds the default action (death, mount left)."""
        if self._old_signals is not None:
            return

        def on_signal(signum, frame):
            _lib.fuse_session_exit(self.se)
            self._done.set()

        self._old_signals = {s: signal.signal(s, on_signal)
                             for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def wait(self, unmount=None) -> None:
        """Serve until unmounted or a SIGTERM/SIGINT/SIGHUP; then unmount
        (``unmount()`` for a mount libfuse did not make)."""
        self.catch_signals()
        old, self._old_signals = self._old_signals, None
        try:
            while not self._done.wait(0.5):
                pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            _lib.fuse_session_exit(self.se)
            _lib.fuse_session_unmount(self.se)  # wakes the workers with ENODEV
            if unmount is not None:
                try:
                    unmount()
                except OSError:
                    pass  # already gone
            for t in self._threads:
                t.join(5)

    def destroy(self) -> None:
        if self.se and not any(t.is_alive() for t in self._threads):
            _lib.fuse_session_destroy(self.se)
            self.se = None

    def _worker(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        self.ops.worker_started()
        buf = FuseBuf()
        se = self.se
        receive, process, exited = (_lib.fuse_session_receive_buf, _lib.fuse_session_process_buf,
                                    _lib.fuse_session_exited)
        ref = ctypes.byref(buf)
        words, base = None, 0
        tls = _tls
        try:
            while not exited(se):
                res = receive(se, ref)
                if res == -errno.EINTR or res == -errno.EAGAIN:
                    continue
                if res <= 0:
                    break
                # the kill bits libfuse does not pass on (FUSE_HANDLE_KILLPRIV_V2),
                # read from the request itself: fuse_in_header is 40 bytes
                if buf.mem != base and not buf.flags & FUSE_BUF_IS_FD:
                    base = buf.mem
                    words = (ctypes.c_uint32 * 16).from_address(base)
                if words is not None and res >= 64:
                    op = words[1]
                    if op == _OP_WRITE:  # fuse_write_in.write_flags
                        tls.kill = words[15] & FUSE_WRITE_KILL_SUIDGID
                    elif op == _OP_SETATTR:  # fuse_setattr_in.valid
                        tls.kill = words[10] & FATTR_KILL_SUIDGID
                    elif op == _OP_INIT:
                        self._note_init(words)
                process(se, ref)
        finally:
            if buf.mem:
                _libc.free(buf.mem)
            self._done.set()

    # ---- notify: changes the kernel did not see ----
    # Written on /dev/fuse as linux/fuse.h lays them out (libfuse 3.14 has no
    # FUSE_EXPIRE_ONLY nor PRUNE): struct fuse_out_header {u32 len; i32 error
    # = the notify code; u64 unique = 0}, the code's struct, then the name and
    # its NUL, in one writev. Each returns 0 or -errno; -ENOENT says the kernel
    # holds no such node or name, which is no error. The protocol minors come
    # from the kernel's INIT (conn->proto_minor), not from what libfuse speaks:
    # an older kernel ignores the flag, and would detach what is mounted there.
    expire_only = False  # inval_entry(expire_only=True): 7.38, Linux 6.2
    can_prune = False  # prune(): 7.45, Linux 6.18

    def _notify(self, code: int, body: bytes, name: bytes | None = None) -> int:
        parts = [body] if name is None else [body, name, b"\0"]
        header = struct.pack("=IiQ", 16 + sum(map(len, parts)), code, 0)
        se = self.se
        if not se:
            return -errno.ENOTCONN
        try:
            os.writev(_lib.fuse_session_fd(se), [header, *parts])
        except OSError as e:
            return -(e.errno or errno.EIO)
        return 0

    def inval_inode(self, node_id: int) -> int:
        """FUSE_NOTIFY_INVAL_INODE: the node's attributes and data."""
        return self._notify(2, struct.pack("=Qqq", node_id, 0, 0))

    def inval_entry(self, parent_id: int, name: bytes, expire_only: bool = False) -> int:
        """FUSE_NOTIFY_INVAL_ENTRY: the kernel drops the name, and with it
        (d_invalidate) every mount on or below it; with ``expire_only``
        (FUSE_EXPIRE_ONLY) it only expires it, to be looked up at next use."""
        return self._notify(3, struct.pack("=QII", parent_id, len(name), 1 if expire_only else 0),
                            name)

    def delete(self, parent_id: int, child_id: int, name: bytes) -> int:
        """FUSE_NOTIFY_DELETE: the name of ``child_id`` is gone."""
        return self._notify(6, struct.pack("=QQII", parent_id, child_id, len(name), 0), name)

    def prune(self, node_ids) -> int:
        """FUSE_NOTIFY_PRUNE: drop the unused names of these nodes (never a
        name something holds, so never a mount point); the kernel then
        FORGETs the nodes nothing else holds."""
        ids = list(node_ids)
        return self._notify(9, struct.pack(f"=IIQ{len(ids)}Q", len(ids), 0, 0, *ids))

    # ---- passthrough backing files (libfuse 3.17, Linux 6.9, CAP_SYS_ADMIN) ----
    def backing_open(self, fd: int) -> int:
        """Register ``fd`` (an open regular file) as a backing file: its
        id, for open replies. The kernel keeps its own reference to the file
        and opens it anew for each passed-through open, with that open's
        flags and the daemon's credentials. OSError if refused."""
        # struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding};
        # with a mutable buffer fcntl.ioctl returns the call's result
        return fcntl.ioctl(_lib.fuse_session_fd(self.se), FUSE_DEV_IOC_BACKING_OPEN,
                           bytearray(struct.pack("iIQ", fd, 0, 0)))

    def backing_close(self, backing_id: int) -> None:
        fcntl.ioctl(_lib.fuse_session_fd(self.se), FUSE_DEV_IOC_BACKING_CLOSE,
                    bytearray(struct.pack("I", backing_id)))

    # ---- the wrappers ----
    def _debugged(self, name, handler):
        def wrapped(req, *args):
            c = _lib.fuse_req_ctx(req).contents
            uid, gid, pid = c.uid, c.gid, c.pid  # the reply frees the request
            _tls.last_result = "ok"
            handler(req, *args)
            try:
                shown = self.ops.describe_args(name, args)
            except Exception:  # noqa: BLE001 (a log line never fails a request)
                shown = "?"
            print(f"shiftfs: {name} {shown} pid {pid} {self.ops.describe_caller(uid, gid)} "
                  f"-> {_tls.last_result}", file=sys.stderr, flush=True)
        return wrapped

    def _fail(self, req, e: BaseException, what: str) -> None:
        if isinstance(e, OSError) and e.errno:
            code = e.errno
        else:
            log.error("%s failed", what, exc_info=e)
            code = errno.EIO
        if self._debug:
            _tls.last_result = errno.errorcode.get(code, str(code))
        _lib.fuse_reply_err(req, code)

    def _call(self, req, what, fn, *args):
        """fn(*args), or the request answered with its error and None."""
        _tls.req = req
        done = self.ops.request_done
        done()  # anything a cleanup after an earlier reply held on this thread
        try:
            return fn(*args)
        except BaseException as e:  # noqa: B902 (a bug must still answer)
            self._fail(req, e, what)
            return None
        finally:
            done()

    def _reply_entry(self, req, e: Entry) -> None:
        if self._debug and not e.node_id:
            _tls.last_result = "ENOENT"
        ep = EntryParam()
        pack_entry(ep, e.node_id, e.st, e.uid, e.gid, e.attr_timeout, e.entry_timeout) \
            if e.st is not None else setattr(ep, "entry_timeout", e.entry_timeout)
        _lib.fuse_reply_entry(req, ctypes.byref(ep))

    def _reply_attr(self, req, attr) -> None:
        st, uid, gid, timeout = attr
        buf = c_stat()
        pack_stat(buf, st, uid, gid)
        _lib.fuse_reply_attr(req, ctypes.byref(buf), timeout)

    def _entry_op(self, req, what, fn, *args) -> None:
        e = self._call(req, what, fn, *args)
        if e is not None:
            self._guarded(req, what, self._reply_entry, e)

    def _err_op(self, req, what, fn, *args) -> None:
        if self._call(req, what, lambda: fn(*args) or True):
            _lib.fuse_reply_err(req, 0)

    def _guarded(self, req, what, reply, value) -> None:
        """A reply that cannot be packed is still an answer (EIO)."""
        try:
            reply(req, value)
        except BaseException as e:  # noqa: B902
            self._fail(req, e, what)

    # ---- lifecycle requests ----
    def _ll_init(self, userdata, conn) -> None:
        try:
            n = conn.contents
            n.want = (n.want | (self.conn_want & n.capable)) & ~self.conn_unwant
            if self.max_readahead:
                n.max_readahead = self.max_readahead
            n.time_gran = 1
            if LIBFUSE_VERSION >= (3, 17):
                self.killpriv_v2 = bool(n.want & FUSE_CAP_HANDLE_KILLPRIV_V2)
            self.expire_only, self.can_prune = n.proto_minor >= 38, n.proto_minor >= 45
            self.ops.init(n.capable, n.want)
        except BaseException as e:  # noqa: B902
            self.init_error = e
            _lib.fuse_session_exit(self.se)

    def _ll_destroy(self, userdata) -> None:
        try:
            self.ops.destroy()
        except BaseException:  # noqa: B902
            log.exception("destroy failed")

    # ---- names ----
    def _ll_lookup(self, req, parent, name):
        self._entry_op(req, "lookup", self.ops.lookup, parent, name)

    def _ll_forget(self, req, node_id, nlookup):
        try:
            self.ops.forget(((node_id, nlookup),))
        except BaseException:  # noqa: B902
            log.exception("forget failed")
        _lib.fuse_reply_none(req)

    def _ll_forget_multi(self, req, count, forgets):
        try:
            self.ops.forget([(forgets[i].ino, forgets[i].nlookup) for i in range(count)])
        except BaseException:  # noqa: B902
            log.exception("forget failed")
        _lib.fuse_reply_none(req)

    def _ll_mknod(self, req, parent, name, mode, rdev):
        self._entry_op(req, "mknod", self.ops.mknod, parent, name, mode, rdev)

    def _ll_mkdir(self, req, parent, name, mode):
        self._entry_op(req, "mkdir", self.ops.mkdir, parent, name, mode)

    def _ll_symlink(self, req, target, parent, name):
        self._entry_op(req, "symlink", self.ops.symlink, target, parent, name)

    def _ll_link(self, req, node_id, parent, name):
        self._entry_op(req, "link", self.ops.link, node_id, parent, name)

    def _ll_unlink(self, req, parent, name):
        self._err_op(req, "unlink", self.ops.unlink, parent, name)

    def _ll_rmdir(self, req, parent, name):
        self._err_op(req, "rmdir", self.ops.rmdir, parent, name)

    def _ll_rename(self, req, parent, name, newparent, newname, flags):
        self._err_op(req, "rename", self.ops.rename, parent, name, newparent, newname, flags)

    # ---- attributes ----
    def _ll_getattr(self, req, node_id, fi):
        attr = self._call(req, "getattr", self.ops.getattr, node_id, fi[0].fh if fi else None)
        if attr is not None:
            self._guarded(req, "getattr", self._reply_attr, attr)

    def _ll_setattr(self, req, node_id, attr, to_set, fi):
        a = attr.contents
        if _tls.kill:
            to_set |= SET_ATTR_KILL_SUIDGID
        result = self._call(req, "setattr", self.ops.setattr, node_id, to_set, a,
                            fi[0].fh if fi else None)
        if result is not None:
            self._guarded(req, "setattr", self._reply_attr, result)

    def _ll_readlink(self, req, node_id):
        target = self._call(req, "readlink", self.ops.readlink, node_id)
        if target is not None:
            _lib.fuse_reply_readlink(req, target)

    def _ll_statfs(self, req, node_id):
        sv = self._call(req, "statfs", self.ops.statfs, node_id)
        if sv is None:
            return
        s = c_statvfs()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                    "f_ffree", "f_favail", "f_flag", "f_namemax"):
            setattr(s, key, getattr(sv, key))
        _lib.fuse_reply_statfs(req, ctypes.byref(s))

    # ---- files ----
    def _open_reply(self, fi, fh, keep_cache, backing_id) -> None:
        f = fi[0]
        f.fh = fh
        if backing_id:  # FOPEN_PASSTHROUGH; the kernel refuses it with KEEP_CACHE
            f.keep_cache = 0
            ctypes.c_int32.from_address(ctypes.addressof(f) + FI_BACKING_ID_OFFSET).value = backing_id
        else:
            f.keep_cache = 1 if keep_cache else 0

    def _ll_open(self, req, node_id, fi):
        result = self._call(req, "open", self.ops.open, node_id, fi[0].flags)
        if result is not None:
            self._open_reply(fi, *result)
            if _lib.fuse_reply_open(req, fi) != 0:  # interrupted: the caller is gone
                self.ops.release(node_id, result[0])

    def _ll_create(self, req, parent, name, mode, fi):
        result = self._call(req, "create", self.ops.create, parent, name, mode, fi[0].flags)
        if result is None:
            return
        entry, fh, backing_id = result
        self._open_reply(fi, fh, False, backing_id)
        ep = EntryParam()
        pack_entry(ep, entry.node_id, entry.st, entry.uid, entry.gid, entry.attr_timeout,
                   entry.entry_timeout)
        if _lib.fuse_reply_create(req, ctypes.byref(ep), fi) != 0:
            self.ops.release(entry.node_id, fh)
            self.ops.forget(((entry.node_id, 1),))

    def _ll_read(self, req, node_id, size, off, fi):
        # A buffer that names the lower fd: libfuse preads into its own
        # buffer and replies (also with the error, if the read fails).
        bv = FuseBufvec()
        bv.count = 1
        b = bv.buf[0]
        b.size, b.flags, b.fd, b.pos = size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK, fi[0].fh, off
        _lib.fuse_reply_data(req, ctypes.byref(bv), 0)

    def _ll_write_buf(self, req, node_id, src, off, fi):
        # FUSE_WRITE_KILL_SUIDGID: set-id bits go before the data, as
        # file_remove_privs does; only writes by callers without CAP_FSETID
        if _tls.kill and self._call(req, "write", self.ops.write_kills_suidgid, node_id,
                                    fi[0].fh) is None:
            return
        dst = FuseBufvec()
        dst.count = 1
        b = dst.buf[0]
        b.size, b.flags, b.fd, b.pos = (_lib.fuse_buf_size(src), FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK,
                                        fi[0].fh, off)
        n = _lib.fuse_buf_copy(ctypes.byref(dst), src, 0)
        if n < 0:
            _lib.fuse_reply_err(req, -n)
        else:
            _lib.fuse_reply_write(req, n)

    # No FLUSH: libfuse answers the first with ENOSYS and the kernel sends
    # no more (nothing is buffered here; locks are the kernel's own).

    def _ll_release(self, req, node_id, fi):
        self._err_op(req, "release", self.ops.release, node_id, fi[0].fh)

    def _ll_fsync(self, req, node_id, datasync, fi):
        self._err_op(req, "fsync", self.ops.fsync, fi[0].fh, datasync)

    def _ll_fallocate(self, req, node_id, mode, off, length, fi):
        self._err_op(req, "fallocate", self.ops.fallocate, fi[0].fh, mode, off, length)

    def _ll_lseek(self, req, node_id, off, whence, fi):
        pos = self._call(req, "lseek", os.lseek, fi[0].fh, off, whence)
        if pos is not None:
            _lib.fuse_reply_lseek(req, pos)

    def _ll_copy_file_range(self, req, ino_in, off_in, fi_in, ino_out, off_out, fi_out, length,
                            flags):
        n = self._call(req, "copy_file_range", self.ops.copy_file_range, fi_in[0].fh, off_in,
                       fi_out[0].fh, off_out, length, flags)
        if n is not None:
            _lib.fuse_reply_write(req, n)

    # ---- directories ----
    def _ll_opendir(self, req, node_id, fi):
        result = self._call(req, "opendir", self.ops.opendir, node_id)
        if result is not None:
            fh, cache = result
            f = fi[0]
            f.fh = fh
            if cache:  # FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE
                f.cache_readdir = 1
                f.keep_cache = 1
            if _lib.fuse_reply_open(req, fi) != 0:
                self.ops.releasedir(node_id, fh)

    def _ll_releasedir(self, req, node_id, fi):
        self._err_op(req, "releasedir", self.ops.releasedir, node_id, fi[0].fh)

    def _ll_fsyncdir(self, req, node_id, datasync, fi):
        self._err_op(req, "fsyncdir", self.ops.fsync, fi[0].fh, datasync)

    def _ll_readdir(self, req, node_id, size, off, fi):
        self._readdir(req, node_id, size, off, fi[0].fh, False)

    def _ll_readdirplus(self, req, node_id, size, off, fi):
        self._readdir(req, node_id, size, off, fi[0].fh, True)

    def _readdir(self, req, node_id, size, off, fh, plus) -> None:
        """Fill one reply from the handle's stream: an entry goes in only
        if it fits, and only then is it looked up (a readdirplus entry
        counts as a lookup, so an entry left out must not be counted)."""
        _tls.req = req
        buf = ctypes.create_string_buffer(size)
        base = ctypes.addressof(buf)
        pos = 0
        ep = EntryParam()
        st_buf = c_stat()
        try:
            stream = self.ops.readdir(node_id, fh, off)
            lookup = self.ops.readdir_entry
            while True:
                item = stream.peek()
                if item is None:
                    break
                name, d_ino, d_type, d_off = item
                need = _dirent_size(len(name), plus)
                if pos + need > size:
                    break
                if plus:
                    e = lookup(node_id, fh, name, d_type)
                    if e is None:  # no attributes: the kernel looks it up if it needs them
                        ctypes.memset(ctypes.addressof(ep), 0, ctypes.sizeof(ep))
                        ep.attr.st_ino, ep.attr.st_mode = d_ino, d_type << 12
                    else:
                        pack_entry(ep, e.node_id, e.st, e.uid, e.gid, e.attr_timeout,
                                   e.entry_timeout)
                    _lib.fuse_add_direntry_plus(req, base + pos, size - pos, name,
                                                ctypes.byref(ep), d_off)
                else:
                    st_buf.st_ino, st_buf.st_mode = d_ino, d_type << 12
                    _lib.fuse_add_direntry(req, base + pos, size - pos, name,
                                           ctypes.byref(st_buf), d_off)
                pos += need
                stream.advance()
        except BaseException as e:  # noqa: B902
            if pos == 0:
                self.ops.request_done()
                self._fail(req, e, "readdir")
                return
            # entries already counted are sent; the error comes next time
        self.ops.request_done()
        _lib.fuse_reply_buf(req, buf, pos)

    # ---- xattrs ----
    def _xattr_reply(self, req, value: bytes, size: int) -> None:
        if size == 0:
            _lib.fuse_reply_xattr(req, len(value))
        elif len(value) > size:
            _lib.fuse_reply_err(req, errno.ERANGE)
        else:
            _lib.fuse_reply_buf(req, value, len(value))

    def _ll_getxattr(self, req, node_id, name, size):
        value = self._call(req, "getxattr", self.ops.getxattr, node_id, name)
        if value is not None:
            self._xattr_reply(req, value, size)

    def _ll_listxattr(self, req, node_id, size):
        value = self._call(req, "listxattr", self.ops.listxattr, node_id)
        if value is not None:
            self._xattr_reply(req, value, size)

    def _ll_setxattr(self, req, node_id, name, value, size, flags):
        self._err_op(req, "setxattr", self.ops.setxattr, node_id, name,
                     ctypes.string_at(value, size), flags)

    def _ll_removexattr(self, req, node_id, name):
        self._err_op(req, "removexattr", self.ops.removexattr, node_id, name)


# ---- libfuse's own log lines ----------------------------------------------------

_LOG_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_NOISE = b"Ignoring invalid max threads value"  # libfuse 3.14's complaint about its own default
_libc.vfprintf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _forward_log(level: int, fmt: bytes, args: int) -> None:
    if fmt and _NOISE not in fmt:
        _libc.vfprintf(ctypes.c_void_p.in_dll(_libc, "stderr"), fmt, args)


_forward_log_c = _LOG_FUNC(_forward_log)  # kept alive for libfuse's lifetime


def quiet_libfuse_noise() -> None:
    """Pass what libfuse says to stderr, less its known noise. The va_list
    travels as a pointer, which holds on x86_64 and aarch64 only."""
    if platform.machine() in ("x86_64", "aarch64") and hasattr(_lib, "fuse_set_log_func"):
        _lib.fuse_set_log_func(_forward_log_c)

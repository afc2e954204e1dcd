"""What mfusepy does not do for us: the only module with ctypes.

- loads libfuse **3** (mfusepy prefers libfuse2 when bindfs installed it);
- hands callbacks bytes paths and raw arguments (no decode, no dicts);
- readdirplus (full attributes with the listing, so `ls -l` costs one
  request), renameat2 flags, raw utimensat timespecs (UTIME_NOW/OMIT),
  read_buf/write_buf on file descriptors (libfuse copies, Python never
  touches the bytes), init capabilities and config;
- keeps one Python thread state per libfuse worker thread (ctypes would
  otherwise build and tear one down for every callback).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
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
_libfuse = mfusepy._libfuse

# fuse_common.h capability bits
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_EXPORT_SUPPORT = 1 << 4
FUSE_CAP_DONT_MASK = 1 << 6
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_CAP_SPLICE_READ = 1 << 9
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_PARALLEL_DIROPS = 1 << 18
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_CAP_HANDLE_KILLPRIV = 1 << 20
FUSE_CAP_CACHE_SYMLINKS = 1 << 23

FUSE_READDIR_PLUS = 1 << 0
FUSE_FILL_DIR_PLUS = 1 << 1
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class FuseBuf(ctypes.Structure):
    # mfusepy's fuse_bufvec is 32 bytes; C's (with the inline buf[1]) is 64
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int),
                ("mem", ctypes.c_void_p), ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class FuseBufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", FuseBuf * 1)]


assert ctypes.sizeof(FuseBufvec) == 64 or ctypes.sizeof(ctypes.c_void_p) != 8

_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
_libfuse.fuse_buf_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_libfuse.fuse_buf_copy.restype = ctypes.c_ssize_t
_libfuse.fuse_buf_size.argtypes = [ctypes.c_void_p]
_libfuse.fuse_buf_size.restype = ctypes.c_size_t
_libfuse.fuse_getgroups.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint)]
_libfuse.fuse_getgroups.restype = ctypes.c_int

CLONE_FS = 0x200
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1


def _raise_errno(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


# ---- syscalls Python's os module lacks --------------------------------------

def renameat2(dirfd: int, old: bytes, new: bytes, flags: int) -> None:
    _raise_errno(_libc.renameat2(dirfd, old, dirfd, new, flags))


def utimensat(dirfd: int, path: bytes, times_ptr: int | None) -> None:
    """Raw timespec pair (UTIME_NOW/UTIME_OMIT kept as they came), never
    following a final symlink."""
    _raise_errno(_libc.utimensat(dirfd, path, times_ptr, AT_SYMLINK_NOFOLLOW))


def futimens(fd: int, times_ptr: int | None) -> None:
    _raise_errno(_libc.futimens(fd, times_ptr))


def set_fsids(uid: int, gid: int) -> None:
    """Per-thread filesystem ids: new lower entries are born with the right
    owner (no window with a wrong one). Needs SECBIT_NO_SETUID_FIXUP so the
    thread keeps its capabilities while its fsuid is not 0."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)


def keep_caps_across_fsuid() -> bool:
    bits = _libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    if bits < 0:
        return False
    return _libc.prctl(PR_SET_SECUREBITS, bits | SECBIT_NO_SETUID_FIXUP, 0, 0, 0) == 0


def limit_mmap_threshold() -> None:
    # glibc otherwise maps and unmaps a fresh 1 MiB buffer for every request
    # (libfuse mallocs one per read reply) ...
    _libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    # ... or, from the heap, gives it back (madvise DONTNEED) at every free
    # and faults it in again: measured 967 madvise calls per 1,024 1 MiB
    # reads and 1.5x the time. Keeps at most this much idle per arena.
    _libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


READ_AHEAD_KB = 1024  # sequential reads in 1 MiB requests (the kernel default is 128 KiB)


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the read-ahead of the FUSE mount at ``mountpoint`` (its bdi,
    /sys/class/bdi/MAJOR:MINOR). Called from init: the mount is in
    mountinfo by then, and nothing here touches the mount itself (which
    would wait for the very INIT reply being prepared). Root only; False
    if it could not be done."""
    from .mount import mountinfo
    try:
        devs = [dev for dev, _src, mp, fstype in mountinfo()
                if mp == mountpoint and fstype.startswith("fuse")]
        dev = devs[-1] if devs else None  # the last (topmost) mount there wins
        if dev is None:
            return False
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))
        return True
    except (OSError, ValueError):
        return False


def caller() -> tuple[int, int, int, int]:
    """(uid, gid, pid, umask) of the request being served."""
    ctx = _libfuse.fuse_get_context().contents
    return ctx.uid, ctx.gid, ctx.pid, ctx.umask


def caller_groups() -> list[int]:
    buf = (ctypes.c_uint * 256)()
    n = _libfuse.fuse_getgroups(256, buf)
    return list(buf[:n]) if n > 0 else []


def exit_session() -> None:
    mfusepy.fuse_exit()


# ---- struct stat --------------------------------------------------------------

if platform.machine() == "x86_64":
    _STAT = struct.Struct("QQQIIIiQqqqqqqqqq24x")

    _pack_into = _STAT.pack_into

    def pack_stat_into(obj, st: os.stat_result, uid: int, gid: int) -> None:
        """Into a c_stat object (pack_into: no bytes object, no memmove)."""
        a, an = divmod(st.st_atime_ns, 1000000000)
        m, mn = divmod(st.st_mtime_ns, 1000000000)
        c, cn = divmod(st.st_ctime_ns, 1000000000)
        _pack_into(obj, 0, st.st_dev, st.st_ino, st.st_nlink, st.st_mode, uid, gid, 0, st.st_rdev,
                   st.st_size, st.st_blksize, st.st_blocks, a, an, m, mn, c, cn)

    def pack_stat(buf, st: os.stat_result, uid: int, gid: int) -> None:
        pack_stat_into(buf.contents, st, uid, gid)
else:
    def pack_stat(buf, st: os.stat_result, uid: int, gid: int) -> None:
        ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
        s = ctypes.cast(buf, ctypes.POINTER(mfusepy.c_stat)).contents
        s.st_dev, s.st_ino, s.st_nlink, s.st_mode = st.st_dev, st.st_ino, st.st_nlink, st.st_mode
        s.st_uid, s.st_gid, s.st_rdev, s.st_size = uid, gid, st.st_rdev, st.st_size
        s.st_blksize, s.st_blocks = st.st_blksize, st.st_blocks
        for name, ns in (("st_atimespec", st.st_atime_ns), ("st_mtimespec", st.st_mtime_ns),
                         ("st_ctimespec", st.st_ctime_ns)):
            t = getattr(s, name)
            t.tv_sec, t.tv_nsec = divmod(ns, 1000000000)

    def pack_stat_into(obj, st: os.stat_result, uid: int, gid: int) -> None:
        pack_stat(ctypes.pointer(obj), st, uid, gid)


# fip[0].fh: 0.06 us; ctypes.cast(fip, POINTER(c_uint64))[word] was 0.5 us
def _fh(fip) -> int | None:
    return fip[0].fh if fip else None


def _set_fh(fip, fh: int) -> None:
    fip[0].fh = fh


def _copy_out(data: bytes, buf, size: int) -> int:
    """The xattr calls' contract: size 0 asks for the length; a buffer too
    small is ERANGE, never a truncated value."""
    if not size:
        return len(data)
    if len(data) > size:
        return -errno.ERANGE
    ctypes.memmove(buf, data, len(data))
    return len(data)


class ShiftFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with the wrappers shiftfs needs. ``operations`` is a
    shiftfs.ops.ShiftOperations; its callbacks take bytes paths (None for
    handle-only requests, as nullpath_ok gives) and raise OSError."""

    def __init__(self, operations, mountpoint: str, config: dict, conn_want: int,
                 conn_unwant: int, **options) -> None:
        self._config = config
        self._conn_want = conn_want
        self._conn_unwant = conn_unwant
        self._pinned_threads: set[int] = set()
        self._mountpoint = os.path.realpath(mountpoint)
        self.init_error: BaseException | None = None
        if options.get("debug"):  # chosen once: no cost per request when off
            self._wrapper = self._debug_wrapper
        super().__init__(operations, mountpoint, raw_fi=True, **options)

    def _wrapper(self, func, *args):
        ident = threading.get_ident()
        if ident not in self._pinned_threads:
            self._adopt_thread(ident)
        try:
            return func(*args) or 0
        except OSError as e:
            return -(e.errno or errno.EIO)
        except Exception:  # a bug: say so (stderr or syslog), do not take the mount down
            log.exception("%s failed", func.__name__.removesuffix("_fuse_3"))
            return -errno.EIO

    def _debug_wrapper(self, func, *args):
        """-d: one line per request on stderr: operation, path, the caller's
        upper ids and the lower ids they stand for, the result."""
        uid, gid, pid, _umask = caller()
        lower_uid = self.operations.uids.to_lower(uid)
        lower_gid = self.operations.gids.to_lower(gid)
        ret = ShiftFUSE._wrapper(self, func, *args)
        path = args[0].decode(errors="replace") if args and isinstance(args[0], bytes) else "-"
        result = errno.errorcode.get(-ret, str(ret)) if isinstance(ret, int) and ret < 0 else "ok"
        print(f"shiftfs: {func.__name__.removesuffix('_fuse_3')} {path} pid {pid} "
              f"upper {uid}:{gid} lower "
              f"{'unmapped' if lower_uid is None else lower_uid}:"
              f"{'unmapped' if lower_gid is None else lower_gid} -> {result}",
              file=sys.stderr, flush=True)
        return ret

    def _adopt_thread(self, ident: int) -> None:
        # A thread state that outlives the callback: ctypes then reuses it
        # instead of creating and destroying one per request.
        ctypes.pythonapi.PyGILState_Ensure()
        # A private umask per thread, so a create can use the caller's.
        _libc.unshare(CLONE_FS)
        self._pinned_threads.add(ident)

    # ---- init ----
    def init_fuse_3(self, conn, config):
        try:
            c = config.contents
            for key, value in self._config.items():
                setattr(c, key, value)
            n = conn.contents
            n.want = (n.want | (self._conn_want & n.capable)) & ~self._conn_unwant
            if set_read_ahead(self._mountpoint, READ_AHEAD_KB):
                # the kernel keeps min(bdi read-ahead, max_readahead) from this reply
                n.max_readahead = READ_AHEAD_KB * 1024
            self.operations.init_connection(n.capable, n.want)
        except BaseException as e:  # mfusepy would swallow it and mount with defaults
            self.init_error = e
            exit_session()
        return None

    def destroy(self, private_data):
        self.operations.destroy()

    # ---- attributes ----
    def getattr_fuse_3(self, path, buf, fip):
        st, uid, gid = self.operations.getattr(path, _fh(fip))
        pack_stat(buf, st, uid, gid)
        return 0

    def readlink(self, path, buf, bufsize):
        target = self.operations.readlink(path)[: bufsize - 1]
        ctypes.memmove(buf, target + b"\0", len(target) + 1)
        return 0

    def chmod_fuse_3(self, path, mode, fip):
        return self.operations.chmod(path, mode, _fh(fip))

    def chown_fuse_3(self, path, uid, gid, fip):
        return self.operations.chown(path, uid, gid, _fh(fip))

    def truncate_fuse_3(self, path, length, fip):
        return self.operations.truncate(path, length, _fh(fip))

    def utimens_fuse_3(self, path, times, fip):
        return self.operations.utimens(path, ctypes.cast(times, ctypes.c_void_p).value, _fh(fip))

    def statfs(self, path, buf):
        sv = self.operations.statfs(path)
        s = buf.contents
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                    "f_ffree", "f_favail", "f_flag", "f_namemax"):
            setattr(s, key, getattr(sv, key))
        return 0

    # ---- names ----
    def mknod(self, path, mode, dev):
        return self.operations.mknod(path, mode, dev)

    def mkdir(self, path, mode):
        return self.operations.mkdir(path, mode)

    def unlink(self, path):
        return self.operations.unlink(path)

    def rmdir(self, path):
        return self.operations.rmdir(path)

    def symlink(self, target, path):
        return self.operations.symlink(target, path)

    def rename_fuse_3(self, old, new, flags):
        return self.operations.rename(old, new, flags)

    def link(self, existing, path):
        return self.operations.link(existing, path)

    # ---- files ----
    def open(self, path, fip):
        _set_fh(fip, self.operations.open(path, fip[0].flags))
        return 0

    def create(self, path, mode, fip):
        _set_fh(fip, self.operations.create(path, mode, fip[0].flags))
        return 0

    def read(self, path, buf, size, offset, fip):
        data = os.pread(_fh(fip), size, offset)
        ctypes.memmove(buf, data, len(data))
        return len(data)

    def write(self, path, buf, size, offset, fip):
        return os.pwrite(_fh(fip), ctypes.string_at(buf, size), offset)

    def read_buf(self, path, bufpp, size, offset, fip):
        # A buffer that names the lower fd: libfuse reads (or splices) the
        # bytes itself. libfuse frees the bufvec, so it must come from malloc.
        addr = _libc.malloc(ctypes.sizeof(FuseBufvec))
        if not addr:
            return -errno.ENOMEM
        bv = FuseBufvec.from_address(addr)
        bv.count, bv.idx, bv.off = 1, 0, 0
        b = bv.buf[0]
        b.size, b.flags, b.mem, b.fd, b.pos = size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK, None, _fh(fip), offset
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = addr
        return 0

    def write_buf(self, path, src, offset, fip):
        dst = FuseBufvec()
        dst.count = 1
        b = dst.buf[0]
        b.size, b.flags, b.fd, b.pos = (_libfuse.fuse_buf_size(src), FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK,
                                        _fh(fip), offset)
        # libfuse pwrite()s into the lower fd; the result is the byte count or -errno
        return _libfuse.fuse_buf_copy(ctypes.byref(dst), src, 0)

    def release(self, path, fip):
        return self.operations.release(_fh(fip))

    def fsync(self, path, datasync, fip):
        return self.operations.fsync(_fh(fip), datasync)

    def fallocate(self, path, mode, offset, length, fip):
        return self.operations.fallocate(_fh(fip), mode, offset, length)

    # ---- directories ----
    def opendir(self, path, fip):
        _set_fh(fip, self.operations.opendir(path))
        return 0

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags):
        fh = _fh(fip)
        plus = bool(flags & FUSE_READDIR_PLUS)
        st_buf = mfusepy.c_stat()
        st_ptr = ctypes.pointer(st_buf)
        fill_flags = FUSE_FILL_DIR_PLUS if plus else 0
        pack = pack_stat_into
        for index, (name, attr) in enumerate(self.operations.readdir(fh, offset, plus), offset + 1):
            if attr is None:
                if filler(buf, name, None, index, 0):
                    break
                continue
            pack(st_buf, *attr)
            # non-zero offsets: libfuse 3.14 drops plus entries at offset 0
            if filler(buf, name, st_ptr, index, fill_flags):
                break
        return 0

    def releasedir(self, path, fip):
        return self.operations.releasedir(_fh(fip))

    def fsyncdir(self, path, datasync, fip):
        return self.operations.fsyncdir(_fh(fip), datasync)

    # ---- xattrs ----
    def setxattr(self, path, name, value, size, options, *args):
        return self.operations.setxattr(path, name, ctypes.string_at(value, size), options)

    def getxattr(self, path, name, value, size, *args):
        return _copy_out(self.operations.getxattr(path, name), value, size)

    def listxattr(self, path, namebuf, size):
        return _copy_out(self.operations.listxattr(path), namebuf, size)

    def removexattr(self, path, name):
        return self.operations.removexattr(path, name)

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _raise_errno(_libc.fallocate(fd, mode, offset, length))


# ---- openat2: a lower directory in one syscall, never through a symlink ----

class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # the same number on x86_64, aarch64 and the generic table
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_DIR_HOW = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                    _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
_libc.syscall.restype = ctypes.c_long


def open_dir_beneath(dir_fd: int, path: bytes) -> int:
    """An O_PATH fd of directory ``path`` below ``dir_fd``; a symlink in any
    component gives ENOTDIR (as a per-component O_NOFOLLOW walk would)."""
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(path),
                       ctypes.byref(_DIR_HOW), ctypes.c_size_t(ctypes.sizeof(_DIR_HOW)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(errno.ENOTDIR if e == errno.ELOOP else e, os.strerror(e))
    return fd


def _has_openat2() -> bool:
    try:
        os.close(open_dir_beneath(AT_FDCWD, b"."))
        return True
    except OSError:
        return False  # ENOSYS before Linux 5.6, or blocked by a seccomp filter


HAS_OPENAT2 = _has_openat2()


# ---- libfuse's own log lines ----------------------------------------------------

_LOG_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_NOISE = b"Ignoring invalid max threads value"  # libfuse 3.14's complaint about its own default
_libc.vfprintf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _forward_log(level: int, fmt: bytes, args: int) -> None:
    if fmt and _NOISE not in fmt:
        _libc.vfprintf(ctypes.c_void_p.in_dll(_libc, "stderr"), fmt, args)


_forward_log_c = _LOG_FUNC(_forward_log)  # kept alive for libfuse's lifetime


def quiet_libfuse_noise() -> None:
    """Every mount printed 'Ignoring invalid max threads value 4294967295'
    (fuse_main in libfuse 3.14 passes UINT_MAX itself); pass everything
    else libfuse says to stderr unchanged. The va_list travels as a pointer,
    which holds on x86_64 and aarch64 only."""
    if platform.machine() in ("x86_64", "aarch64") and hasattr(_libfuse, "fuse_set_log_func"):
        _libfuse.fuse_set_log_func(_forward_log_c)

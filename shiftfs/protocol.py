"""The FUSE wire format (include/uapi/linux/fuse.h): opcodes, the structs
of requests and replies as precompiled ``struct.Struct``s, INIT flags and
the notifications the daemon sends on its own. Pure: no I/O, and it
imports nothing of ours.

Every layout here is checked against the installed kernel header by
tests/test_protocol_layout.py. Sizes are those of the newest protocol
this file knows (7.44); a field a kernel's minor does not have is sent as
zero and ignored by it (the kernel reads variable-size INIT replies)."""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 45  # what this file speaks; the kernel says its own at INIT
MIN_MINOR = 31     # Linux 5.4 (HANDLE_KILLPRIV_V2 came in 7.33, EXPIRE_ONLY in 7.38)

# ---- opcodes ----------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 39, 40, 41, 42, 43, 44
RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE = (
    45, 46, 47, 48, 49, 50, 51)
STATX, COPY_FILE_RANGE_64 = 52, 53

NAMES = {v: k.lower() for k, v in list(globals().items())
         if k.isupper() and isinstance(v, int) and 0 < v < 64 and not k.startswith(("KERNEL", "MIN"))}

# ---- INIT flags (flags | flags2 << 32) -------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
HAS_RESEND = 1 << 39

# ---- request and reply flags -----------------------------------------------
GETATTR_FH = 1 << 0
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = (
    1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8)
FATTR_CTIME, FATTR_KILL_SUIDGID = 1 << 10, 1 << 11
WRITE_CACHE, WRITE_KILL_SUIDGID = 1 << 0, 1 << 2  # fuse_write_in.write_flags
FSYNC_FDATASYNC = 1 << 0
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_NONSEEKABLE, FOPEN_CACHE_DIR = 1, 2, 4, 8
FOPEN_NOFLUSH, FOPEN_PARALLEL_DIRECT_WRITES, FOPEN_PASSTHROUGH = 1 << 5, 1 << 6, 1 << 7
IOCTL_UNRESTRICTED, IOCTL_DIR = 1 << 1, 1 << 4
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags

NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY, NOTIFY_DELETE, NOTIFY_RESEND, NOTIFY_PRUNE = 2, 3, 6, 7, 9
UNIQUE_RESEND = 1 << 63  # in a resent request's unique (FUSE_NOTIFY_RESEND)

# /dev/fuse ioctls: _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map),
# _IOW(229, 2, uint32_t)
DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0
DEV_IOC_BACKING_OPEN = (1 << 30) | (16 << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2
MAX_STACK_DEPTH = 1  # backing files on plain filesystems only (overlayfs may stack on us)

# ---- structs ----------------------------------------------------------------
IN_HEADER = struct.Struct("=IIQQIIIHH")       # len opcode unique nodeid uid gid pid total_extlen
OUT_HEADER = struct.Struct("=IiQ")            # len error unique
ATTR_FMT = "QQQQQQIIIIIIIIII"                 # fuse_attr (88)
ATTR = struct.Struct("=" + ATTR_FMT)
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR_FMT)   # nodeid generation entry/attr valid (+nsec)
ATTR_OUT = struct.Struct("=QII" + ATTR_FMT)        # attr_valid attr_valid_nsec dummy attr
OPEN_OUT = struct.Struct("=QIi")              # fh open_flags backing_id
ENTRY_OPEN_OUT = struct.Struct("=QQQQII" + ATTR_FMT + "QIi")
WRITE_OUT = struct.Struct("=II")
GETXATTR_IN = struct.Struct("=II")            # size padding (also fuse_getxattr_out)
SETXATTR_IN = struct.Struct("=II")            # size flags (FUSE_COMPAT_SETXATTR_IN_SIZE: no SETXATTR_EXT)
FORGET_IN = struct.Struct("=Q")
FORGET_ONE = struct.Struct("=QQ")
BATCH_FORGET_IN = struct.Struct("=II")
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")             # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")               # mode umask
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")                # flags open_flags
CREATE_IN = struct.Struct("=IIII")            # flags mode umask open_flags
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")           # fh offset size read_flags lock_owner flags
WRITE_IN = READ_IN                            # fh offset size write_flags lock_owner flags
FSYNC_IN = struct.Struct("=QII")
ACCESS_IN = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
LSEEK_OUT = struct.Struct("=Q")
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")
IOCTL_IN = struct.Struct("=QIIQII")           # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("=iIII")            # result flags in_iovs out_iovs
STATFS_OUT = struct.Struct("=QQQQQIIII24x")   # blocks bfree bavail files ffree bsize namelen frsize
INIT_IN = struct.Struct("=IIIII44x")          # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")  # ... flags2 max_stack_depth request_timeout
DIRENT = struct.Struct("=QQII")               # ino off namelen type
DIRENTPLUS = struct.Struct("=QQQQII" + ATTR_FMT + "QQII")  # ENTRY_OUT then DIRENT, one pack
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")
NOTIFY_DELETE_OUT = struct.Struct("=QQII")
NOTIFY_PRUNE_OUT = struct.Struct("=IIQ")      # count padding spare, then count node ids (7.45)
BACKING_MAP = struct.Struct("=iIQ")           # fd flags padding

SIZES = {  # sizeof() in the kernel header, for the layout test
    "fuse_in_header": IN_HEADER.size, "fuse_out_header": OUT_HEADER.size,
    "fuse_attr": ATTR.size, "fuse_entry_out": ENTRY_OUT.size, "fuse_attr_out": ATTR_OUT.size,
    "fuse_open_out": OPEN_OUT.size, "fuse_write_out": WRITE_OUT.size,
    "fuse_getxattr_in": GETXATTR_IN.size,
    "fuse_forget_in": FORGET_IN.size, "fuse_forget_one": FORGET_ONE.size,
    "fuse_batch_forget_in": BATCH_FORGET_IN.size, "fuse_getattr_in": GETATTR_IN.size,
    "fuse_setattr_in": SETATTR_IN.size, "fuse_mknod_in": MKNOD_IN.size,
    "fuse_mkdir_in": MKDIR_IN.size, "fuse_rename_in": RENAME_IN.size,
    "fuse_rename2_in": RENAME2_IN.size, "fuse_link_in": LINK_IN.size,
    "fuse_open_in": OPEN_IN.size, "fuse_create_in": CREATE_IN.size,
    "fuse_release_in": RELEASE_IN.size, "fuse_flush_in": FLUSH_IN.size,
    "fuse_read_in": READ_IN.size, "fuse_write_in": WRITE_IN.size, "fuse_fsync_in": FSYNC_IN.size,
    "fuse_access_in": ACCESS_IN.size, "fuse_interrupt_in": INTERRUPT_IN.size,
    "fuse_fallocate_in": FALLOCATE_IN.size, "fuse_lseek_in": LSEEK_IN.size,
    "fuse_lseek_out": LSEEK_OUT.size, "fuse_copy_file_range_in": COPY_FILE_RANGE_IN.size,
    "fuse_ioctl_in": IOCTL_IN.size, "fuse_ioctl_out": IOCTL_OUT.size,
    "fuse_kstatfs": STATFS_OUT.size, "fuse_init_in": INIT_IN.size,
    "fuse_init_out": INIT_OUT.size, "fuse_dirent": DIRENT.size, "fuse_direntplus": DIRENTPLUS.size,
    "fuse_notify_inval_inode_out": NOTIFY_INVAL_INODE_OUT.size,
    "fuse_notify_inval_entry_out": NOTIFY_INVAL_ENTRY_OUT.size,
    "fuse_notify_delete_out": NOTIFY_DELETE_OUT.size,
}

_NS = 1000000000


def attr_fields(st, uid: int, gid: int) -> tuple:
    """fuse_attr from a lower stat result, with the upper ids."""
    # st[7:10] are the whole seconds of atime, mtime, ctime
    a, m, c = st[7], st[8], st[9]
    return (st.st_ino, st.st_size, st.st_blocks, a, m, c, st.st_atime_ns - a * _NS,
            st.st_mtime_ns - m * _NS, st.st_ctime_ns - c * _NS, st.st_mode, st.st_nlink,
            uid, gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)


_SPLIT: dict[float, tuple[int, int]] = {}


def split_timeout(seconds: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of a lifetime; the few values a mount uses
    are split once."""
    try:
        return _SPLIT[seconds]
    except KeyError:
        pass
    s = int(seconds)
    out = (s, int((seconds - s) * _NS))
    if len(_SPLIT) < 64:
        _SPLIT[seconds] = out
    return out


def pack_entry(node_id: int, st, uid: int, gid: int, attr_timeout: float,
               entry_timeout: float) -> bytes:
    """fuse_entry_out; ``st`` None is a negative entry (node 0)."""
    es, ens = split_timeout(entry_timeout)
    if st is None:
        return ENTRY_OUT.pack(0, 0, es, 0, ens, 0, *_NO_ATTR)
    at, atn = split_timeout(attr_timeout)
    return ENTRY_OUT.pack(node_id, 0, es, at, ens, atn, *attr_fields(st, uid, gid))


_NO_ATTR = (0,) * 16


def pack_direntplus_into(buf, pos: int, node_id: int, st, uid: int, gid: int,
                         attr_timeout: float, entry_timeout: float, ino: int, off: int,
                         name: bytes, dtype: int) -> int:
    """One fuse_direntplus of a positive entry at ``pos`` of a zeroed
    buffer (fuse_entry_out and pack_dirent's fuse_dirent in one struct, one call: a
    readdirplus reply holds ~40); returns the next position (8-aligned)."""
    es, ens = split_timeout(entry_timeout)
    at, atn = split_timeout(attr_timeout)
    DIRENTPLUS.pack_into(buf, pos, node_id, 0, es, at, ens, atn, *attr_fields(st, uid, gid),
                         ino, off, len(name), dtype)
    start = pos + DIRENTPLUS.size
    buf[start:start + len(name)] = name
    return (start + len(name) + 7) & ~7


def pack_attr(st, uid: int, gid: int, timeout: float) -> bytes:
    at, atn = split_timeout(timeout)
    return ATTR_OUT.pack(at, atn, 0, *attr_fields(st, uid, gid))


def dirent_size(namelen: int, plus: bool) -> int:
    return (namelen + (ENTRY_OUT.size if plus else 0) + DIRENT.size + 7) & ~7


def pack_dirent(buf: bytearray, pos: int, ino: int, off: int, name: bytes, dtype: int,
                zeroed: bool = False) -> int:
    """One fuse_dirent at ``pos``; returns the next position (8-aligned).
    ``zeroed``: the buffer holds zeros past ``pos`` (no padding to write)."""
    DIRENT.pack_into(buf, pos, ino, off, len(name), dtype)
    start = pos + DIRENT.size
    buf[start:start + len(name)] = name
    end = (start + len(name) + 7) & ~7
    if not zeroed:
        buf[start + len(name):end] = bytes(end - start - len(name))
    return end


def names(body, count: int) -> list[bytes]:
    """``count`` NUL-terminated names from the start of ``body``."""
    out = []
    raw = bytes(body)
    pos = 0
    for _ in range(count):
        end = raw.index(b"\0", pos)
        out.append(raw[pos:end])
        pos = end + 1
    return out


def name(body) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def named_args(op: int, nodeid: int, body) -> tuple:
    """What a request names, for the -d log (describe.Describer.args): the
    node (or parent) first, then the name, as the handlers take them."""
    try:
        if op in (LOOKUP, UNLINK, RMDIR, REMOVEXATTR):
            return (nodeid, name(body))
        if op == MKNOD or op == CREATE:
            return (nodeid, name(body[16:]))
        if op == MKDIR:
            return (nodeid, name(body[8:]))
        if op == SYMLINK:
            made, target = names(body, 2)
            return (target, nodeid, made)
        if op == LINK:
            return (LINK_IN.unpack_from(body)[0], nodeid, name(body[8:]))
        if op == RENAME:
            old, new = names(body[8:], 2)
            return (nodeid, old, RENAME_IN.unpack_from(body)[0], new)
        if op == RENAME2:
            old, new = names(body[16:], 2)
            return (nodeid, old, RENAME2_IN.unpack_from(body)[0], new)
        if op in (GETXATTR, SETXATTR):
            return (nodeid, name(body[8:]))
    except (ValueError, IndexError):
        pass
    return (nodeid,)

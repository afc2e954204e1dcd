"""The raw Linux calls Python's os module lacks, through ctypes: renameat2,
*at calls on O_PATH fds (AT_EMPTY_PATH), per-thread filesystem ids,
getdents64 with the lower's own offsets, fallocate, and the malloc tuning
the data path needs. Imports nothing of ours."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC  # a held inode, never a link's target

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syscall.restype = ctypes.c_long

CLONE_FS = 0x200
PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(old_dir, old, new_dir, new, flags))


_times = threading.local()


def utimens_fd(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Times of the inode an (O_PATH) fd holds; (sec, nsec) pairs, nsec may
    be UTIME_NOW or UTIME_OMIT. Never follows a symlink: the fd is the
    inode itself."""
    try:
        times = _times.held
    except AttributeError:  # one struct timespec[2] a thread, filled in place
        times = _times.held = (ctypes.c_long * 4)()
    times[0], times[1] = atime
    times[2], times[3] = mtime
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH))


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): works on O_PATH fds, symlinks
    included; -1 keeps an id."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


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


PR_SET_NAME = 15


def name_thread(name: str) -> None:
    """This thread's name in /proc (comm, 15 bytes): where its CPU goes."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG SIGKILL: this process ends when the one that forked
    it does (a server without its supervisor holds no mount)."""
    _libc.prctl(1, 9, 0, 0, 0)


def caps_kept_across_fsuid() -> bool:
    """Whether this thread keeps its capabilities while its fsuid is not 0
    (SECBIT_NO_SETUID_FIXUP, set by keep_caps_across_fsuid)."""
    bits = _libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    return bits >= 0 and bool(bits & SECBIT_NO_SETUID_FIXUP)


def private_fs_struct() -> bool:
    """A umask of this thread's own (unshare CLONE_FS), so a create can use
    the caller's. Whether it worked."""
    return _libc.unshare(CLONE_FS) == 0


def limit_mmap_threshold() -> None:
    # glibc otherwise maps and unmaps a fresh 1 MiB buffer for every request
    # (libfuse mallocs one per read reply) ...
    _libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    # ... or, from the heap, gives it back (madvise DONTNEED) at every free
    # and faults it in again. Keeps at most this much idle per arena.
    _libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


# ---- getdents64: a directory streamed with the lower's own offsets ---------

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine, 61)
_DIRENT = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the name


def getdents(fd: int, buf: ctypes.Array) -> list[tuple[bytes, int, int, int]]:
    """One getdents64 call: [(name, d_ino, d_type, d_off)], where d_off is
    the offset of the entry after this one (what lseek takes to resume).
    Empty at the end of the directory."""
    n = _check(_libc.syscall(_SYS_GETDENTS64, ctypes.c_int(fd), buf, ctypes.c_size_t(len(buf))))
    raw = buf.raw[:n] if n else b""
    out = []
    pos = 0
    unpack = _DIRENT.unpack_from
    while pos < n:
        d_ino, d_off, reclen, d_type = unpack(raw, pos)
        name = raw[pos + 19:pos + reclen]
        out.append((name[:name.index(b"\0")], d_ino, d_type, d_off))
        pos += reclen
    return out


DIRBUF = 32768  # bytes a DirStream reads at once


class DirStream:
    """An open lower directory, read in getdents batches and resumed at the
    offsets the lower gives: memory per handle is one batch, whatever the
    directory's size."""

    __slots__ = ("fd", "pos", "batch", "index", "buf")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.batch: list = []
        self.index = 0
        self.buf = None

    def seek(self, off: int) -> None:
        if off != self.pos:
            os.lseek(self.fd, off, os.SEEK_SET)
            self.pos, self.batch, self.index = off, [], 0

    def peek(self):
        if self.index >= len(self.batch):
            if self.buf is None:
                self.buf = ctypes.create_string_buffer(DIRBUF)
            self.batch, self.index = getdents(self.fd, self.buf), 0
            if not self.batch:
                return None
        return self.batch[self.index]

    def advance(self) -> None:
        self.pos = self.batch[self.index][3]
        self.index += 1


# ---- mount(2) for a synchronous FUSE INIT ----------------------------------

MS_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
            "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24,
            "lazytime": 1 << 25, "rw": 0, "suid": 0, "dev": 0, "exec": 0}
MNT_DETACH = 2
FUSE_DEV_IOC_SYNC_INIT = (229 << 8) | 3  # _IO(FUSE_DEV_IOC_MAGIC, 3), Linux 6.18
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()))


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags))


# ---- the new mount API (Linux 5.2): a mount of a directory of a new FUSE
# filesystem, made without a path for the FUSE root ----------------------------

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 428, 429, 430, 431, 432
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x04, 0x40
_SYS_OPENAT2, RESOLVE_NO_SYMLINKS = 437, 0x04
# -o words that are per-mount attributes in this API (the rest go to fsconfig)
MOUNT_ATTRS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x10,
               "strictatime": 0x20, "nodiratime": 0x80, "relatime": 0, "rw": 0, "suid": 0,
               "dev": 0, "exec": 0}


def _sys(number: int, *args) -> int:
    return _check(_libc.syscall(ctypes.c_long(number), *args))


def fsopen(fstype: str) -> int:
    return _sys(_SYS_FSOPEN, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(1))  # FSOPEN_CLOEXEC


def fsconfig(fs_fd: int, key: str, value: str | None = None) -> None:
    """A flag (``value`` None) or a string parameter of a new superblock."""
    command = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
    _sys(_SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(command), ctypes.c_char_p(key.encode()),
         ctypes.c_char_p(None if value is None else value.encode()), ctypes.c_int(0))


def fsconfig_create(fs_fd: int) -> None:
    _sys(_SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE),
         ctypes.c_char_p(None), ctypes.c_char_p(None), ctypes.c_int(0))


def fsmount(fs_fd: int, attrs: int) -> int:
    return _sys(_SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(1), ctypes.c_uint(attrs))  # FSMOUNT_CLOEXEC


def open_tree_clone(dir_fd: int, name: str) -> int:
    """A detached bind mount of ``name`` below ``dir_fd``'s mount."""
    return _sys(_SYS_OPEN_TREE, ctypes.c_int(dir_fd), ctypes.c_char_p(name.encode()),
                ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC))


def move_mount_to(mount_fd: int, target_fd: int) -> None:
    """Attach ``mount_fd`` on the directory ``target_fd`` holds (no path:
    what was checked is what is mounted on)."""
    _sys(_SYS_MOVE_MOUNT, ctypes.c_int(mount_fd), ctypes.c_char_p(b""), ctypes.c_int(target_fd),
         ctypes.c_char_p(b""), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))


def open_dir_no_symlinks(path: str) -> int:
    """An O_PATH fd of the directory ``path`` resolved without following
    any symlink (openat2 RESOLVE_NO_SYMLINKS, Linux 5.6): ELOOP if a
    component is one. For the mount point, which a user may be able to
    swap under a root daemon."""
    how = struct.pack("QQQ", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
    buf = ctypes.create_string_buffer(how, len(how))
    return _sys(_SYS_OPENAT2, ctypes.c_int(AT_FDCWD), ctypes.c_char_p(path.encode()),
                buf, ctypes.c_size_t(len(how)))


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (as in /proc/self/mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(0, "no mnt_id in fdinfo")


# ---- fanotify with file handles ------------------------------------------------

FAN_CLOEXEC = 0x1
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000  # Linux 5.17: dirent events carry the child's fid too
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ONDIR = 0x40000000
FAN_INFO_FID, FAN_INFO_DFID_NAME, FAN_INFO_DFID = 1, 2, 3
FAN_INFO_OLD_DFID_NAME, FAN_INFO_NEW_DFID_NAME = 10, 12
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_EVENT = struct.Struct("=IBBHQii")  # fanotify_event_metadata
_INFO = struct.Struct("=BBH")       # fanotify_event_info_header


def fanotify_init(flags: int) -> int:
    return _check(_libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC))


def fanotify_mark(fd: int, flags: int, mask: int, path: str, dir_fd: int = AT_FDCWD) -> None:
    """An inode mark (the default kind) on ``path`` (relative to ``dir_fd``).
    Not an O_PATH fd with no path: fanotify wants a real fd for that, so a
    held directory is marked as ".", anything else as /proc/self/fd/N."""
    _check(_libc.fanotify_mark(fd, flags, mask, dir_fd, path.encode()))


# a pointer of its own without argtypes: ctypes then passes the ints,
# bytes, buffer and byref as they are, in half the time of converting
# them by argtypes (this call comes for every readdirplus entry)
_name_to_handle_at = ctypes.CDLL(None, use_errno=True).name_to_handle_at
_name_to_handle_at.argtypes = None
_name_to_handle_at.restype = ctypes.c_int
_MAX_HANDLE_SZ = 128


_handle_buffers = threading.local()
_SIZE = struct.Struct("=I")


def name_to_handle(fd: int, flags: int = 0, name: bytes = b"") -> bytes | None:
    """The file handle (struct file_handle) of the inode ``fd`` holds (or
    of ``name`` in directory ``fd``, never through a symlink), or None
    where the filesystem has none."""
    try:
        buf, mount_id, view = _handle_buffers.held
    except AttributeError:  # one buffer a thread, not one a call
        buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
        mount_id, view = ctypes.byref(ctypes.c_int()), memoryview(buf).cast("B")
        _handle_buffers.held = buf, mount_id, view
    _SIZE.pack_into(buf, 0, _MAX_HANDLE_SZ)
    if _name_to_handle_at(fd, name, buf, mount_id, flags if name else AT_EMPTY_PATH | flags) < 0:
        return None
    return view[:8 + _SIZE.unpack_from(buf, 0)[0]].tobytes()


def malloc_trim() -> None:
    """Give the C heap's free memory back to the system (glibc; nothing
    where the C library has no malloc_trim)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


# struct file_handle's head for FILEID_INO32_GEN (ext4, xfs below 2^32
# inodes): 8 bytes, the inode's number and generation
_INO32_GEN = struct.pack("=Ii", 8, 1)
_INO_GEN = struct.Struct("=II")


def ino_and_gen(handle: bytes | None) -> tuple[int, int] | None:
    """(inode number, generation) of a FILEID_INO32_GEN handle; None for
    any other (or none). The one reader of that format."""
    if handle is None or len(handle) != 16 or handle[:8] != _INO32_GEN:
        return None
    return _INO_GEN.unpack_from(handle, 8)


def ino32_gen_handle(ino: int, gen: int) -> bytes:
    """The FILEID_INO32_GEN handle of inode ``ino`` of generation ``gen``."""
    return _INO32_GEN + _INO_GEN.pack(ino, gen)


def handle_ino(handle: bytes) -> int | None:
    """The inode number a FILEID_INO32_GEN handle holds; None for any other."""
    ino_gen = ino_and_gen(handle)
    return None if ino_gen is None else ino_gen[0]


def names_one_inode(handle: bytes) -> bool:
    """Whether ``handle`` names one inode, not whatever inode has its
    number: False for a FILEID_INO32_GEN handle of generation 0, which
    ext2/ext4 and f2fs decode without checking the generation
    (ext4_nfs_get_inode: ``if (generation && ...)``). mke2fs -d writes
    generation 0 into every inode of the image it builds, and the owner
    of a file on ext4 without metadata_csum may set it (FS_IOC_SETVERSION)."""
    ino_gen = ino_and_gen(handle)
    return ino_gen is None or ino_gen[1] != 0


def fs_type(dev: int) -> str:
    """The filesystem type of device ``dev`` as mountinfo names it
    ("tmpfs", "fuse.sshfs", ...); "" if no mount of it is listed."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                return fields[fields.index("-") + 1]
    return ""


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """``handle`` is a struct file_handle as name_to_handle gives it. A
    handle whose inode is gone fails ESTALE, or ENOMEM where decoding found
    no dentry (fs/fhandle.c turns that NULL into ENOMEM; nfsd takes either
    as stale): ESTALE both."""
    try:
        return _check(_libc.open_by_handle_at(mount_fd, handle, flags))
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise OSError(errno.ESTALE, "stale file handle") from None
        raise


AT_HANDLE_FID = 0x200  # Linux 6.5: the handle fanotify reports, also where none can be opened


def fid_of(fd: int, handle: bytes | None = None) -> bytes | None:
    """The inode's fid as fanotify reports it: its filesystem's fsid (8
    bytes, as statfs gives it) and its struct file_handle (``handle``, if
    the caller has it already); None where the filesystem has none."""
    if handle is None:
        handle = name_to_handle(fd, AT_HANDLE_FID) or name_to_handle(fd)
        if handle is None:
            return None
    return struct.pack("=Q", os.fstatvfs(fd).f_fsid) + handle


def fanotify_events(data: bytes, skip_pid: int = 0):
    """(mask, pid, [(info type, fid, name)]) per event, the fid as fid_of
    gives it; events of ``skip_pid`` are passed over unparsed."""
    pos = 0
    while pos + _EVENT.size <= len(data):
        event_len, _vers, _res, meta_len, mask, fd, pid = _EVENT.unpack_from(data, pos)
        if event_len < meta_len:
            break
        if fd >= 0:
            os.close(fd)
        if pid == skip_pid and skip_pid and not mask & FAN_Q_OVERFLOW:
            pos += event_len
            continue
        infos = []
        ipos, end = pos + meta_len, pos + event_len
        while ipos + _INFO.size <= end:
            kind, _pad, length = _INFO.unpack_from(data, ipos)
            if length < _INFO.size:
                break
            body = data[ipos + _INFO.size:ipos + length]  # fsid, then struct file_handle
            if len(body) >= 16:
                hbytes = struct.unpack_from("=I", body, 8)[0]
                fid = body[:16 + hbytes]
                name = body[16 + hbytes:].split(b"\0", 1)[0]
                infos.append((kind, fid, name))
            ipos += length
        yield mask, pid, infos
        pos += event_len

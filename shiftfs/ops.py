"""The passthrough operations: resolve the lower path, do the syscall,
translate the ids. The only module that knows both the lower tree and the
table.

Every callback takes bytes paths as libfuse gives them ("/a/b", or None for
requests that only carry a handle) and raises OSError on failure; fuse.py
turns that into -errno.

Caveats (honest ones, as in pyfuse3's passthroughfs):
- The lower root is held open as a directory fd and every call is relative
  to it (``*at`` syscalls), so paths cannot climb out of it with ``..`` and
  a lower directory swapped or mounted over afterwards does not change what
  is served. Intermediate components are not checked for symlinks: the
  kernel resolves symlinks above us, so only a concurrent change made
  directly on the lower side could insert one.
- Handles are lower file descriptors; data moves between them and libfuse
  without passing through Python (read_buf/write_buf in fuse.py).
- POSIX locks and flock are left to the kernel (local to this mount).
"""

from __future__ import annotations

import errno
import os

from . import fuse, policy, xattrs
from .idmap import IdMap

UNCHANGED = 0xFFFFFFFF  # (uid_t)-1 in chown: keep this id
_O_PATH_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def _rel(path: bytes) -> bytes:
    """FUSE path ("/a/b") -> path relative to the lower root fd."""
    return path[1:] or b"."


class ShiftOperations:
    use_ns = True

    def __init__(self, lower: str, idmap: IdMap) -> None:
        self.root = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.proc_root = b"/proc/self/fd/%d/" % self.root
        self.idmap = idmap
        self.uids = idmap.uids
        self.gids = idmap.gids
        self.daemon_uid = os.geteuid()
        self.daemon_gid = os.getegid()
        self.posix_acl = False
        self._listings: dict[int, list] = {}

    # ---- helpers ----
    def _lstat(self, path: bytes) -> os.stat_result:
        return os.stat(_rel(path), dir_fd=self.root, follow_symlinks=False)

    def _attr(self, st: os.stat_result) -> tuple[os.stat_result, int, int]:
        return st, self.idmap.uid_to_upper(st.st_uid), self.idmap.gid_to_upper(st.st_gid)

    def _caller_lower_ids(self) -> tuple[int, int, int]:
        """The caller's (lower uid, lower gid, umask); EOVERFLOW if either
        id has no lower counterpart (it could not own anything here)."""
        uid, gid, _pid, umask = fuse.caller()
        lower_uid = self.uids.to_lower(uid)
        lower_gid = self.gids.to_lower(gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "caller has no lower id")
        return lower_uid, lower_gid, umask

    def _create_as_caller(self, make, *args, **kwargs):
        """Run ``make`` with the thread's fsuid/fsgid set to the caller's
        lower ids and its umask to the caller's: the lower kernel then gives
        the new entry its owner, its set-gid group, its default ACL and its
        mode in one step, as for a local caller."""
        lower_uid, lower_gid, umask = self._caller_lower_ids()
        os.umask(umask)
        fuse.set_fsids(lower_uid, lower_gid)
        try:
            return make(*args, **kwargs)
        finally:
            fuse.set_fsids(self.daemon_uid, self.daemon_gid)

    def _frozen_check(self, path: bytes | None, fh: int | None, what: str) -> os.stat_result:
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        policy.check_modify(st, self.uids, self.gids, what)
        return st

    # ---- lifecycle ----
    def init_connection(self, capable: int, want: int) -> None:
        self.posix_acl = bool(want & fuse.FUSE_CAP_POSIX_ACL)

    def destroy(self) -> None:
        os.close(self.root)

    # ---- attributes ----
    def getattr(self, path, fh):
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        return self._attr(st)

    def readlink(self, path):
        return os.readlink(_rel(path), dir_fd=self.root)

    def statfs(self, path):
        return os.fstatvfs(self.root)

    def chmod(self, path, mode, fh):
        self._frozen_check(path, fh, "chmod")
        if fh is not None:
            os.fchmod(fh, mode)
        else:
            os.chmod(_rel(path), mode, dir_fd=self.root)

    def chown(self, path, uid, gid, fh):
        lower_uid = -1 if uid == UNCHANGED else self.uids.to_lower(uid)
        lower_gid = -1 if gid == UNCHANGED else self.gids.to_lower(gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "id has no lower counterpart")
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        policy.check_chown(st, self.uids, self.gids, fuse.caller()[0])
        if fh is not None:
            os.fchown(fh, lower_uid, lower_gid)
        else:
            os.chown(_rel(path), lower_uid, lower_gid, dir_fd=self.root, follow_symlinks=False)

    def truncate(self, path, length, fh):
        self._frozen_check(path, fh, "write")
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self.proc_root + _rel(path), length)

    def utimens(self, path, times_ptr, fh):
        self._frozen_check(path, fh, "utimes" if times_ptr is None else "chmod")
        if fh is not None:
            fuse.futimens(fh, times_ptr)
        else:
            fuse.utimensat(self.root, _rel(path), times_ptr)

    # ---- names ----
    def mknod(self, path, mode, dev):
        self._create_as_caller(os.mknod, _rel(path), mode, dev, dir_fd=self.root)

    def mkdir(self, path, mode):
        self._create_as_caller(os.mkdir, _rel(path), mode, dir_fd=self.root)

    def symlink(self, target, path):
        self._create_as_caller(os.symlink, target, _rel(path), dir_fd=self.root)

    def create(self, path, mode, flags):
        return self._create_as_caller(
            os.open, _rel(path), flags | os.O_CREAT | _O_PATH_FLAGS, mode, dir_fd=self.root)

    def link(self, existing, path):
        self._caller_lower_ids()
        policy.check_modify(self._lstat(existing), self.uids, self.gids, "link")
        os.link(_rel(existing), _rel(path), src_dir_fd=self.root, dst_dir_fd=self.root,
                follow_symlinks=False)

    def unlink(self, path):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "unlink")
        os.unlink(_rel(path), dir_fd=self.root)

    def rmdir(self, path):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "unlink")
        os.rmdir(_rel(path), dir_fd=self.root)

    def rename(self, old, new, flags):
        policy.check_modify(self._lstat(old), self.uids, self.gids, "rename")
        if flags:
            fuse.renameat2(self.root, _rel(old), _rel(new), flags)
        else:
            os.rename(_rel(old), _rel(new), src_dir_fd=self.root, dst_dir_fd=self.root)

    # ---- files ----
    def open(self, path, flags):
        fd = os.open(_rel(path), flags | _O_PATH_FLAGS, dir_fd=self.root)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            try:
                policy.check_modify(os.fstat(fd), self.uids, self.gids, "write")
            except OSError:
                os.close(fd)
                raise
        return fd

    # Data moves in fuse.py, straight between the lower fd (the handle) and
    # libfuse's buffers; these names only make mfusepy register the calls.
    def read_buf(self, *args):
        raise NotImplementedError

    write_buf = read_buf

    def release(self, fh):
        os.close(fh)

    def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    def fallocate(self, fh, mode, offset, length):
        fuse.fallocate(fh, mode, offset, length)

    # ---- directories ----
    def opendir(self, path):
        fd = os.open(_rel(path), os.O_RDONLY | os.O_DIRECTORY | _O_PATH_FLAGS, dir_fd=self.root)
        self._listings[fd] = []
        return fd

    def readdir(self, fh, offset, plus):
        """(name, (lower stat, upper uid, upper gid) or None) from entry
        ``offset`` on; the listing is taken once per opendir."""
        if offset == 0:
            with os.scandir(fh) as it:
                self._listings[fh] = [(b".", None), (b"..", None)] + [
                    (os.fsencode(e.name), e) for e in it]
        listing = self._listings[fh]
        for name, entry in listing[offset:]:
            if entry is None:
                yield name, None
                continue
            try:
                yield name, self._attr(entry.stat(follow_symlinks=False))
            except FileNotFoundError:  # removed since the listing was taken
                continue

    def releasedir(self, fh):
        self._listings.pop(fh, None)
        os.close(fh)

    def fsyncdir(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    # ---- extended attributes ----
    def getxattr(self, path, name):
        value = os.getxattr(self.proc_root + _rel(path), name, follow_symlinks=False)
        return xattrs.to_upper(name, value, self.idmap)

    def listxattr(self, path):
        names = os.listxattr(self.proc_root + _rel(path), follow_symlinks=False)
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def setxattr(self, path, name, value, flags):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "setxattr")
        value = xattrs.to_lower(name, value, self.idmap)
        os.setxattr(self.proc_root + _rel(path), name, value, flags, follow_symlinks=False)

    def removexattr(self, path, name):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "setxattr")
        os.removexattr(self.proc_root + _rel(path), name, follow_symlinks=False)

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
  is served. The kernel resolves symlinks above us, but the lower tree can
  change behind its back (directly, or through another mount of the same
  lower): so the parent of every path is reached one component at a time
  with O_NOFOLLOW (``_at``) and no call follows a symlink in the last
  component; nothing ever resolves outside the lower root.
- Handles are lower file descriptors; data moves between them and libfuse
  without passing through Python (read_buf/write_buf in fuse.py).
- POSIX locks and flock are left to the kernel (local to this mount).
"""

from __future__ import annotations

import errno
import os
import stat

from . import fuse, policy, xattrs
from .idmap import IdMap

CAP_FSETID = 4
UNCHANGED = 0xFFFFFFFF  # (uid_t)-1 in chown: keep this id
_O_PATH_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _rel(path: bytes) -> bytes:
    """FUSE path ("/a/b") -> path relative to the lower root fd."""
    return path[1:] or b"."


_CAP_SYS_ADMIN = 21


def _caller_cap_eff(pid: int) -> int:
    """The caller's effective capability mask (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return policy.parse_cap_eff(f.read())
    except OSError:
        return 0


def _in_daemon_userns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def _caller_sys_admin() -> bool:
    """Whether the caller holds CAP_SYS_ADMIN in the daemon's user namespace
    (the kernel's test for seeing trusted.* names). Unknown means no."""
    pid = fuse.caller()[2]
    return _in_daemon_userns(pid) and bool(_caller_cap_eff(pid) >> _CAP_SYS_ADMIN & 1)


class _Everything:
    """Stands in for the frozen-path hints once there are too many to keep:
    every path may be frozen (each check then pays a stat)."""

    def __bool__(self):
        return True

    def __contains__(self, path):
        return True

    def __setitem__(self, path, value):
        pass

    def pop(self, path, default=None):
        return default

    def items(self):
        return ()


_FROZEN_HINTS_MAX = 1 << 18
_ACL_ACCESS = "system.posix_acl_access"


def _proc(dir_fd: int, name: bytes) -> bytes:
    """A path naming ``name`` in the directory ``dir_fd`` for calls that
    take no dir fd (the magic link jumps straight to that directory)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


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
        # FUSE paths getattr found frozen: only these are checked for read,
        # exec and search (a hint: verified by a stat before it is used)
        self._frozen: dict[bytes, None] | _Everything = {}
        self._frozen_fhs: set[int] = set()  # open frozen directories
        self._ovf_uid, self._ovf_gid = idmap.overflow_uid, idmap.overflow_gid

    # ---- path resolution: never out of the lower root ----
    def _walk(self, head: bytes) -> int:
        """An O_PATH fd of the lower directory ``head`` (relative, no
        leading '/'), reached one component at a time with O_NOFOLLOW: a
        symlink put in place of a directory on the lower side (directly, or
        through another mount of the same lower) after the kernel looked the
        directory up gives ENOTDIR instead of leading out of the tree.
        With openat2 (Linux 5.6+) the kernel does the same walk in one call."""
        if fuse.HAS_OPENAT2:
            return fuse.open_dir_beneath(self.root, head)
        fd = self.root
        try:
            for comp in head.split(b"/"):
                nxt = os.open(comp, _WALK_FLAGS, dir_fd=fd)
                if fd != self.root:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self.root:
                os.close(fd)
            raise
        return fd

    def _at(self, path: bytes, fn, *args, **kwargs):
        """``fn(name, *args, dir_fd=parent, **kwargs)`` for a FUSE path, the
        parent reached by _walk. Every path-based syscall goes through here
        (or _at2); each one must also not follow a symlink in ``name``."""
        head, _, name = path[1:].rpartition(b"/")
        if not head:
            return fn(name or b".", *args, dir_fd=self.root, **kwargs)
        fd = self._walk(head)
        try:
            return fn(name, *args, dir_fd=fd, **kwargs)
        finally:
            os.close(fd)

    def _at2(self, path1: bytes, path2: bytes, fn):
        """``fn(name1, dir_fd1, name2, dir_fd2)`` for two FUSE paths."""
        return self._at(path1, lambda n1, dir_fd: self._at(
            path2, lambda n2, dir_fd, fd1=dir_fd: fn(n1, fd1, n2, dir_fd)))

    # ---- helpers ----
    def _lstat(self, path: bytes) -> os.stat_result:
        return self._at(path, os.stat, follow_symlinks=False)

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

    def _parent_lstat(self, path: bytes) -> os.stat_result:
        return self._lstat(path.rpartition(b"/")[0] or b"/")

    def _caller_mapped(self) -> bool:
        uid, gid, _pid, _umask = fuse.caller()
        return self.uids.to_lower(uid) is not None and self.gids.to_lower(gid) is not None

    def _create_as_caller(self, path, make, *args):
        """``make(name, *args, dir_fd=parent)`` with the thread's fsuid/fsgid
        set to the caller's lower ids and its umask to the caller's: the
        lower kernel then gives the new entry its owner, its set-gid group,
        its default ACL and its mode in one step, as for a local caller. The
        parent is resolved once; it must not be frozen."""
        lower_uid, lower_gid, umask = self._caller_lower_ids()

        def create(name, dir_fd):
            policy.check_dir_write(os.fstat(dir_fd), self.uids, self.gids)
            os.umask(umask)
            fuse.set_fsids(lower_uid, lower_gid)
            try:
                return make(name, *args, dir_fd=dir_fd)
            finally:
                fuse.set_fsids(self.daemon_uid, self.daemon_gid)
        return self._at(path, create)

    def _frozen_check(self, path: bytes | None, fh: int | None, what: str) -> os.stat_result:
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        policy.check_modify(st, self.uids, self.gids, what)
        return st

    # ---- frozen inodes: reading, listing, searching, exec ----
    def _note_frozen(self, path: bytes, st: os.stat_result) -> None:
        if policy.is_frozen(st, self.uids, self.gids):
            if len(self._frozen) >= _FROZEN_HINTS_MAX:
                self._frozen = _Everything()
            self._frozen[path] = None

    def _frozen_access(self, path: bytes, st: os.stat_result, want: int, fd: int | None) -> bool:
        """EACCES unless the caller may ``want`` this inode as an idmapped
        mount decides for a frozen inode (mode bits, mapped group, ACL; no
        capability). False (and the hint dropped) if it is not frozen."""
        if not policy.is_frozen(st, self.uids, self.gids):
            self._frozen.pop(path, None)
            return False
        acl = None
        if st.st_mode & 0o070 and not stat.S_ISLNK(st.st_mode):
            try:
                acl = os.getxattr(fd, _ACL_ACCESS) if fd is not None else self._at(
                    path, lambda n, dir_fd: os.getxattr(_proc(dir_fd, n), _ACL_ACCESS,
                                                        follow_symlinks=False))
            except OSError:
                pass
        uid, gid, _pid, _umask = fuse.caller()
        groups = {gid, *fuse.caller_groups()}
        if not policy.frozen_permitted(st, self.uids, self.gids, uid, groups, want, acl):
            raise OSError(errno.EACCES, "inode has an unmapped owner")
        return True

    def _check_search(self, path: bytes) -> None:
        """A lookup in a frozen directory needs search (x) permission on it
        (the FUSE client checked against the overflow id, capabilities
        included)."""
        parent = path.rpartition(b"/")[0] or b"/"
        if parent in self._frozen:
            try:
                st = self._lstat(parent)
            except FileNotFoundError:
                self._frozen.pop(parent, None)
                return
            self._frozen_access(parent, st, policy.MAY_EXEC, None)

    def _frozen_renamed(self, old: bytes, new: bytes, exchange: bool) -> None:
        """Keep the hints on the paths the kernel will use after a rename of
        a directory above them (a frozen inode itself cannot be renamed)."""
        moves = []
        for src, dst in ((old, new), (new, old)) if exchange else ((old, new),):
            prefix = src + b"/"
            moves += [(p, dst + p[len(src):]) for p, _ in list(self._frozen.items())
                      if p == src or p.startswith(prefix)]
        for p, _ in moves:
            self._frozen.pop(p, None)
        for _, q in moves:
            self._frozen[q] = None

    # ---- lifecycle ----
    def init_connection(self, capable: int, want: int) -> None:
        self.posix_acl = bool(want & fuse.FUSE_CAP_POSIX_ACL)

    def destroy(self) -> None:
        os.close(self.root)

    # ---- attributes ----
    def getattr(self, path, fh):
        if fh is None and self._frozen and path != b"/":
            self._check_search(path)
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        attr = self._attr(st)
        if (attr[1] == self._ovf_uid or attr[2] == self._ovf_gid) and fh is None:
            self._note_frozen(path, st)
        return attr

    def readlink(self, path):
        return self._at(path, os.readlink)

    def statfs(self, path):
        return os.fstatvfs(self.root)

    def chmod(self, path, mode, fh):
        self._frozen_check(path, fh, "chmod")
        if fh is not None:
            os.fchmod(fh, mode)
        else:
            try:  # never through a symlink put in the lower tree behind our back
                self._at(path, os.chmod, mode, follow_symlinks=False)
            except ValueError:  # Python's word for EOPNOTSUPP on a symlink
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink") from None

    def chown(self, path, uid, gid, fh):
        lower_uid = -1 if uid == UNCHANGED else self.uids.to_lower(uid)
        lower_gid = -1 if gid == UNCHANGED else self.gids.to_lower(gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "id has no lower counterpart")
        st = os.fstat(fh) if fh is not None else self._lstat(path)
        policy.check_chown(st, self.uids, self.gids, fuse.caller()[0], lower_uid, lower_gid)
        if fh is not None:
            os.fchown(fh, lower_uid, lower_gid)
        else:
            self._at(path, os.chown, lower_uid, lower_gid, follow_symlinks=False)
        if st.st_mode & stat.S_ISGID and self._chown_drops_sgid(st):
            mode = stat.S_IMODE(st.st_mode) & ~stat.S_ISGID
            if fh is not None:
                os.fchmod(fh, mode)
            else:
                self._at(path, os.chmod, mode, follow_symlinks=False)

    def _chown_drops_sgid(self, st: os.stat_result) -> bool:
        """The kernel's rule for S_ISGID without group exec on chown, which
        the upper kernel's FUSE client does not apply: needs the caller's
        groups and capabilities (from /proc/PID)."""
        uid, gid, pid, _umask = fuse.caller()
        upper_gid = self.idmap.gid_to_upper(st.st_gid)
        in_group = gid == upper_gid or upper_gid in fuse.caller_groups()
        capable = not in_group and self._caller_capable(
            CAP_FSETID, pid, self.idmap.uid_to_upper(st.st_uid), upper_gid)
        return policy.chown_drops_sgid(st, in_group, capable)

    def _caller_capable(self, cap: int, pid: int, upper_uid: int, upper_gid: int) -> bool:
        """capable_wrt_inode_uidgid for the caller: ``cap`` effective in its
        user namespace, and (outside the daemon's namespace) the inode's ids
        mapped in that namespace."""
        if not _caller_cap_eff(pid) >> cap & 1:
            return False
        if _in_daemon_userns(pid):
            return True
        try:
            with open(f"/proc/{pid}/uid_map") as u, open(f"/proc/{pid}/gid_map") as g:
                return policy.id_in_map(u.read(), upper_uid) and policy.id_in_map(g.read(), upper_gid)
        except OSError:  # the caller is gone: no privilege to act on
            return False

    def truncate(self, path, length, fh):
        self._frozen_check(path, fh, "write")
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            # O_PATH|O_NOFOLLOW pins the inode itself (a symlink swapped in
            # on the lower side is truncated as a symlink: EINVAL, and is
            # never followed out of the tree)
            fd = self._at(path, os.open, os.O_PATH | _O_PATH_FLAGS)
            try:
                os.truncate(f"/proc/self/fd/{fd}", length)
            finally:
                os.close(fd)

    def utimens(self, path, times_ptr, fh):
        if times_ptr is None:
            kind = policy.utimes_kind(None, None)
        else:
            times = (fuse.Timespec * 2).from_address(times_ptr)
            kind = policy.utimes_kind(times[0].tv_nsec, times[1].tv_nsec)
        self._frozen_check(path, fh, kind)
        if fh is not None:
            fuse.futimens(fh, times_ptr)
        else:
            self._at(path, lambda name, dir_fd: fuse.utimensat(dir_fd, name, times_ptr))

    # ---- names ----
    def mknod(self, path, mode, dev):
        self._create_as_caller(path, os.mknod, mode, dev)

    def mkdir(self, path, mode):
        self._create_as_caller(path, os.mkdir, mode)

    def symlink(self, target, path):
        self._create_as_caller(path, lambda name, dir_fd: os.symlink(target, name, dir_fd=dir_fd))

    def create(self, path, mode, flags):
        return self._create_as_caller(path, os.open, flags | os.O_CREAT | _O_PATH_FLAGS, mode)

    def link(self, existing, path):
        policy.check_link(self._lstat(existing), self._caller_mapped(), self._parent_lstat(path),
                          self.uids, self.gids)
        self._at2(existing, path, lambda a, fa, b, fb: os.link(
            a, b, src_dir_fd=fa, dst_dir_fd=fb, follow_symlinks=False))

    def _delete(self, path, remove):
        def checked_remove(name, dir_fd):
            # the parent fd we remove from is the one whose stat is checked
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            policy.check_delete(st, os.fstat(dir_fd), self.uids, self.gids)
            remove(name, dir_fd=dir_fd)
        self._at(path, checked_remove)

    def unlink(self, path):
        self._delete(path, os.unlink)

    def rmdir(self, path):
        self._delete(path, os.rmdir)

    def rename(self, old, new, flags):
        try:
            new_st = self._lstat(new)
        except FileNotFoundError:
            new_st = None
        if new_st is not None and flags & fuse.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "rename: target exists")
        policy.check_rename(self._lstat(old), self._parent_lstat(old), new_st,
                            self._parent_lstat(new), new_st is not None or self._caller_mapped(),
                            self.uids, self.gids)
        if flags:
            self._at2(old, new, lambda a, fa, b, fb: fuse.renameat2(
                fuse.AT_FDCWD, _proc(fa, a), _proc(fb, b), flags))
        else:
            self._at2(old, new, lambda a, fa, b, fb: os.rename(
                a, b, src_dir_fd=fa, dst_dir_fd=fb))
        if self._frozen:
            self._frozen_renamed(old, new, bool(flags & fuse.RENAME_EXCHANGE))

    # ---- files ----
    def open(self, path, flags):
        fd = self._at(path, os.open, flags | _O_PATH_FLAGS)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            try:
                policy.check_modify(os.fstat(fd), self.uids, self.gids, "write")
            except OSError:
                os.close(fd)
                raise
        elif self._frozen and path in self._frozen:  # read or exec of a frozen file
            try:
                self._frozen_access(path, os.fstat(fd), policy.open_want(flags), fd)
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
        fd = self._at(path, os.open, os.O_RDONLY | os.O_DIRECTORY | _O_PATH_FLAGS)
        if self._frozen and path in self._frozen:
            try:
                if self._frozen_access(path, os.fstat(fd), policy.MAY_READ, fd):
                    self._frozen_fhs.add(fd)
            except OSError:
                os.close(fd)
                raise
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
        hide = bool(self._frozen_fhs) and fh in self._frozen_fhs
        for name, entry in listing[offset:]:
            if entry is None:
                yield name, None
                continue
            try:
                attr = self._attr(entry.stat(follow_symlinks=False))
            except FileNotFoundError:  # removed since the listing was taken
                continue
            # Frozen entries, and all entries of a frozen directory, come
            # without attributes: the kernel then looks each one up, and
            # getattr can check it (see _check_search, _note_frozen).
            if hide or attr[1] == self._ovf_uid or attr[2] == self._ovf_gid:
                attr = None
            yield name, attr

    def releasedir(self, fh):
        self._listings.pop(fh, None)
        if self._frozen_fhs:
            self._frozen_fhs.discard(fh)
        os.close(fh)

    def fsyncdir(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    # ---- extended attributes ----
    def getxattr(self, path, name):
        if self._frozen and path in self._frozen and policy.xattr_read_needs_permission(name):
            self._frozen_access(path, self._lstat(path), policy.MAY_READ, None)
        if path == b"/":
            # The kernel asks this for every lookup through the mount root
            # (it made the root inode before INIT enabled ACLs, so never
            # caches its ACL): one syscall on the held root fd.
            value = os.getxattr(self.root, name)
        else:
            value = self._at(path, lambda n, dir_fd: os.getxattr(
                _proc(dir_fd, n), name, follow_symlinks=False))
        return xattrs.to_upper(name, value, self.idmap)

    def listxattr(self, path):
        names = self._at(path, lambda n, dir_fd: os.listxattr(_proc(dir_fd, n), follow_symlinks=False))
        if any(n.startswith("trusted.") for n in names) and not _caller_sys_admin():
            # a local filesystem lists trusted.* only to CAP_SYS_ADMIN callers;
            # the daemon (root) sees them all, so filter as the kernel would
            names = [n for n in names if not n.startswith("trusted.")]
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def setxattr(self, path, name, value, flags):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "setxattr")
        value = xattrs.to_lower(name, value, self.idmap)
        self._at(path, lambda n, dir_fd: os.setxattr(
            _proc(dir_fd, n), name, value, flags, follow_symlinks=False))

    def removexattr(self, path, name):
        policy.check_modify(self._lstat(path), self.uids, self.gids, "setxattr")
        self._at(path, lambda n, dir_fd: os.removexattr(_proc(dir_fd, n), name, follow_symlinks=False))

"""Who the caller is, beyond the ids the request header carries: its groups,
its capabilities over an inode, whether it is inside a chown, and the
serving thread's fsuid, fsgid and umask switched to its own for a create.

After virtiofsd's credentials: the kernel checked the caller's permission
on the upper inode; what it leaves to the daemon (FUSE_HANDLE_KILLPRIV_V2,
set-gid rules the FUSE client does not apply, trusted.* names) needs the
caller's capabilities, read from /proc/PID. A caller that is gone has
none. Upper ids throughout, except where a name says lower.
"""

from __future__ import annotations

import errno
import os
import threading

from . import linux, policy
from .filesystem import Context
from .idmap import IdMap

CAP_FOWNER = 3
CAP_FSETID = 4
CAP_SYS_ADMIN = 21
# lowers whose calls are decided by the calling thread's capabilities alone
# (not by a server or daemon that sees its fsuid): a create may leave the
# caller's fsuid on a serving thread there (Fsids)
LOCAL_TYPES = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "bcachefs",
                         "jfs", "reiserfs", "nilfs2", "zfs"))
_CHOWN_SYSCALLS = {"x86_64": {92, 93, 94, 260}, "aarch64": {54, 55}}.get(os.uname().machine, set())


def cap_eff(pid: int) -> int:
    """The caller's effective capability mask (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return policy.parse_cap_eff(f.read())
    except OSError:
        return 0


def in_daemon_userns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def has_cap(ctx: Context, cap: int) -> bool:
    """Whether the caller holds ``cap`` in the daemon's user namespace (the
    kernel's capable(): CAP_SYS_ADMIN for seeing trusted.* names,
    CAP_FSETID for keeping set-id bits on a write). Unknown means no."""
    return in_daemon_userns(ctx.pid) and bool(cap_eff(ctx.pid) >> cap & 1)


def capable_over(cap: int, pid: int, upper_uid: int, upper_gid: int) -> bool:
    """capable_wrt_inode_uidgid for the caller: ``cap`` effective in its
    user namespace, and (outside the daemon's namespace) the inode's ids
    mapped in that namespace."""
    if not cap_eff(pid) >> cap & 1:
        return False
    if in_daemon_userns(pid):
        return True
    try:
        with open(f"/proc/{pid}/uid_map") as u, open(f"/proc/{pid}/gid_map") as g:
            return policy.id_in_map(u.read(), upper_uid) and policy.id_in_map(g.read(), upper_gid)
    except OSError:  # the caller is gone: no privilege to act on
        return False


def in_chown(ctx: Context) -> bool:
    """The chown probe: whether the caller is inside a chown-family
    syscall. An empty SETATTR is either chown(-1, -1) or a write's set-gid
    clearing, and the kernel treats the two differently. Unknown means no."""
    try:
        with open(f"/proc/{ctx.pid}/syscall", "rb") as f:
            return int(f.read().split(None, 1)[0]) in _CHOWN_SYSCALLS
    except (OSError, ValueError, IndexError):
        return False


class Groups:
    """The caller's groups (fsgid and supplementary, upper ids) as
    policy.frozen_permitted asks for them: ``gid in groups``. The
    supplementary ones are read from /proc only when a question needs them
    (a frozen inode whose group class or ACL group entries decide)."""

    __slots__ = ("ctx", "_more")

    def __init__(self, ctx: Context) -> None:
        self.ctx, self._more = ctx, None

    def __contains__(self, gid) -> bool:
        if gid == self.ctx.gid:
            return True
        if self._more is None:
            self._more = frozenset(self.ctx.groups())
        return gid in self._more


class Callers:
    """The caller's standing over lower inodes, through the table."""

    __slots__ = ("idmap",)

    def __init__(self, idmap: IdMap) -> None:
        self.idmap = idmap

    def lower_ids(self, ctx: Context) -> tuple[int, int]:
        """The caller's (lower uid, lower gid); EOVERFLOW if either id has
        no lower counterpart (it could not own anything here)."""
        lower_uid = self.idmap.uids.to_lower(ctx.uid)
        lower_gid = self.idmap.gids.to_lower(ctx.gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "caller has no lower id")
        return lower_uid, lower_gid

    def mapped(self, ctx: Context) -> bool:
        return (self.idmap.uids.to_lower(ctx.uid) is not None
                and self.idmap.gids.to_lower(ctx.gid) is not None)

    def owns(self, ctx: Context, st: os.stat_result) -> bool:
        """inode_owner_or_capable: the caller's fsuid owns it, or it holds
        CAP_FOWNER over it."""
        owner = self.idmap.uid_to_upper(st.st_uid)
        return ctx.uid == owner or capable_over(
            CAP_FOWNER, ctx.pid, owner, self.idmap.gid_to_upper(st.st_gid))

    def may_keep_sgid(self, ctx: Context, st: os.stat_result, new_upper_gid: int | None) -> bool:
        """setattr_copy's rule, which the upper kernel's FUSE client does not
        apply and the daemon (CAP_FSETID) would not meet: a mode keeps
        S_ISGID only for a caller in the file's group or with CAP_FSETID
        over it. It is what clears the bit when a write by someone outside
        the group kills set-uid (the kernel sends the mode with S_ISGID
        still in it)."""
        upper_gid = self.idmap.gid_to_upper(st.st_gid) if new_upper_gid is None else new_upper_gid
        if ctx.gid == upper_gid or upper_gid in ctx.groups():
            return True
        return capable_over(CAP_FSETID, ctx.pid, self.idmap.uid_to_upper(st.st_uid), upper_gid)

    def chown_drops_sgid(self, ctx: Context, st: os.stat_result) -> bool:
        """The kernel's rule for S_ISGID without group exec on chown, which
        the upper kernel's FUSE client does not apply."""
        upper_gid = self.idmap.gid_to_upper(st.st_gid)
        in_group = ctx.gid == upper_gid or upper_gid in ctx.groups()
        capable = not in_group and capable_over(
            CAP_FSETID, ctx.pid, self.idmap.uid_to_upper(st.st_uid), upper_gid)
        return policy.chown_drops_sgid(st, in_group, capable)


class Fsids:
    """Each serving thread's fsuid, fsgid and umask. A create switches them
    to the caller's lower ids (``as_caller``), so the lower kernel gives
    owner, set-gid group, default ACL and mode in one step; each is set
    only where it differs. They are left the caller's after a create where
    nothing else reads them (``keep``): the thread keeps its capabilities
    whatever its fsuid (SECBIT_NO_SETUID_FIXUP, set before the threads
    start), and the lower is a local filesystem, which decides by those
    capabilities (an NFS server, or a FUSE lower's daemon, would see the
    caller's ids on every later call). Otherwise the daemon's come back."""

    def __init__(self, lower_type: str) -> None:
        self.daemon_uid, self.daemon_gid = os.geteuid(), os.getegid()
        self._thread = threading.local()
        self.keep = (self.daemon_uid == 0 and lower_type in LOCAL_TYPES
                     and linux.caps_kept_across_fsuid())

    def worker_started(self) -> None:
        if linux.private_fs_struct():  # a umask of its own: it may be left as a create set it
            self._thread.ids = [self.daemon_uid, self.daemon_gid, -1]

    def as_caller(self, lower_uid: int, lower_gid: int, umask: int) -> _AsCaller:
        """``with fsids.as_caller(uid, gid, umask):`` make an entry."""
        return _AsCaller(self, lower_uid, lower_gid, umask)

    def set(self, lower_uid: int, lower_gid: int, umask: int) -> None:
        ids = getattr(self._thread, "ids", None)
        if ids is None:  # not a serving thread: its umask is the process's
            os.umask(umask)
            linux.set_fsids(lower_uid, lower_gid)
            return
        if ids[2] != umask:
            os.umask(umask)
            ids[2] = umask
        if ids[0] != lower_uid or ids[1] != lower_gid:
            linux.set_fsids(lower_uid, lower_gid)
            ids[0], ids[1] = lower_uid, lower_gid

    def restore(self, always: bool = False) -> None:
        """The daemon's own fsuid and fsgid back on this thread: after a
        create where the thread would lose its capabilities otherwise
        (``always``: before anything that makes an inode outside a create,
        a rename's whiteout)."""
        ids = getattr(self._thread, "ids", None)
        if ids is None:  # not a serving thread: as it was
            linux.set_fsids(self.daemon_uid, self.daemon_gid)
        elif self.keep and not always:
            return
        elif ids[0] != self.daemon_uid or ids[1] != self.daemon_gid:
            linux.set_fsids(self.daemon_uid, self.daemon_gid)
            ids[0], ids[1] = self.daemon_uid, self.daemon_gid


class _AsCaller:
    __slots__ = ("fsids", "uid", "gid", "umask")

    def __init__(self, fsids: Fsids, uid: int, gid: int, umask: int) -> None:
        self.fsids, self.uid, self.gid, self.umask = fsids, uid, gid, umask

    def __enter__(self) -> None:
        self.fsids.set(self.uid, self.gid, self.umask)

    def __exit__(self, *exc) -> None:
        self.fsids.restore()

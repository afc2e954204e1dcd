"""SETATTR on a lower inode as the kernel's notify_change would make it on
an idmapped mount: mode, owner, size and times, in the order libfuse's
high-level API used, with the set-id rules the upper kernel's FUSE client
leaves to the daemon (FUSE_HANDLE_KILLPRIV_V2; set-gid kept only for a
caller in the group or with CAP_FSETID over the inode; chown's clearing).
The caller's capabilities come from caller.py, the frozen rules from
policy.py; ops.Operations.setattr hands each request here."""

from __future__ import annotations

import errno
import os
import stat

from . import caller, linux, policy
from .caller import CAP_FSETID, Callers
from .filesystem import (SET_ATTR_ATIME, SET_ATTR_ATIME_NOW, SET_ATTR_GID, SET_ATTR_KILL_SUIDGID,
                         SET_ATTR_MODE, SET_ATTR_MTIME, SET_ATTR_MTIME_NOW, SET_ATTR_SIZE,
                         SET_ATTR_UID, Context, SetAttr)
from .idmap import IdMap

UNCHANGED = 0xFFFFFFFF  # (uid_t)-1 in chown: keep this id
_TIMES = SET_ATTR_ATIME | SET_ATTR_MTIME | SET_ATTR_ATIME_NOW | SET_ATTR_MTIME_NOW
_SETS = SET_ATTR_MODE | SET_ATTR_UID | SET_ATTR_GID | SET_ATTR_SIZE | _TIMES


class AttrChanges:
    def __init__(self, idmap: IdMap, callers: Callers) -> None:
        self.uids, self.gids = idmap.uids, idmap.gids
        self.callers = callers

    def apply(self, ctx: Context, node, attr: SetAttr, fh: int | None) -> None:
        """``attr`` on ``node`` (through ``fh`` where the caller has it
        open). A SETATTR with nothing to set still reaches here (see
        ``_nothing``)."""
        st = os.fstat(node.fd)
        to_set = attr.valid
        if to_set & SET_ATTR_MODE:
            self._mode(ctx, node, attr, fh, st)
            st = os.fstat(node.fd)
        if to_set & (SET_ATTR_UID | SET_ATTR_GID):
            self.chown(ctx, node, st, attr.uid if to_set & SET_ATTR_UID else UNCHANGED,
                       attr.gid if to_set & SET_ATTR_GID else UNCHANGED)
            st = os.fstat(node.fd)
        if to_set & SET_ATTR_SIZE:
            self._size(ctx, node, attr, fh, st)
        if to_set & _TIMES:
            self._times(node, attr, st)
        if not to_set & _SETS:
            self._nothing(ctx, node, st)

    def _mode(self, ctx: Context, node, attr: SetAttr, fh: int | None, st) -> None:
        policy.check_modify(st, self.uids, self.gids, "chmod")
        mode = stat.S_IMODE(attr.mode)
        if mode & stat.S_ISGID and not self.callers.may_keep_sgid(
                ctx, st, attr.gid if attr.valid & SET_ATTR_GID else None):
            mode &= ~stat.S_ISGID
        if fh is not None:
            os.fchmod(fh, mode)
        elif stat.S_ISLNK(node.mode):
            raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
        else:
            os.chmod(node.path, mode)

    def _size(self, ctx: Context, node, attr: SetAttr, fh: int | None, st) -> None:
        policy.check_modify(st, self.uids, self.gids, "write")
        if attr.valid & SET_ATTR_KILL_SUIDGID:  # a truncate by a caller without CAP_FSETID
            self.kill_suidgid(ctx, node, fh, st)
        if fh is not None:
            os.ftruncate(fh, attr.size)
        elif not node.is_reg():
            raise OSError(errno.EINVAL, "truncate of a non-regular file")
        else:
            os.truncate(node.path, attr.size)

    def _times(self, node, attr: SetAttr, st) -> None:
        to_set = attr.valid
        atime = (0, policy.UTIME_NOW) if to_set & SET_ATTR_ATIME_NOW else (
            attr.atime if to_set & SET_ATTR_ATIME else (0, policy.UTIME_OMIT))
        mtime = (0, policy.UTIME_NOW) if to_set & SET_ATTR_MTIME_NOW else (
            attr.mtime if to_set & SET_ATTR_MTIME else (0, policy.UTIME_OMIT))
        policy.check_modify(st, self.uids, self.gids, policy.utimes_kind(atime[1], mtime[1]))
        linux.utimens_fd(node.fd, atime, mtime)

    def _nothing(self, ctx: Context, node, st) -> None:
        """Nothing to set: chown(-1, -1), where notify_change refuses a
        frozen inode and otherwise only ctime moves (and the lower's chown
        clears set-uid, as any chown does) -- or the privileges a write or
        truncate drops (file_remove_privs: only ATTR_KILL_* was left),
        where a chown of the lower would clear set-uid for a caller with
        CAP_FSETID too."""
        if caller.in_chown(ctx):
            self.chown(ctx, node, st, UNCHANGED, UNCHANGED)
        else:
            self._remove_privs(ctx, node, st)

    def _remove_privs(self, ctx: Context, node, st: os.stat_result) -> None:
        """The empty SETATTR of file_remove_privs (a write, truncate or
        passed-through write that finds set-id bits or a capability): the
        capability went by its own REMOVEXATTR; the bits go as
        setattr_should_drop_suidgid says, unless the caller holds
        CAP_FSETID (in the initial namespace: the kernel's capable()). The
        kernel sends set-uid and group-exec set-gid as a mode instead where
        FUSE_HANDLE_KILLPRIV_V2 is off; then only set-gid without group exec
        is left to clear here."""
        policy.check_chown(st, self.uids, self.gids, ctx.uid)
        if not caller.has_cap(ctx, CAP_FSETID):
            self.kill_suidgid(ctx, node, None, st)

    def kill_suidgid(self, ctx: Context, node, fh: int | None, st: os.stat_result) -> None:
        """setattr_should_drop_suidgid for a caller without CAP_FSETID
        (the kernel checked that, and sent the kill bit)."""
        mode = st.st_mode
        if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
            return
        keep_sgid = bool(mode & stat.S_ISGID) and not mode & stat.S_IXGRP and \
            self.callers.may_keep_sgid(ctx, st, None)
        new = policy.killed_suidgid_mode(mode, keep_sgid)
        if new != stat.S_IMODE(mode):
            if fh is not None:
                os.fchmod(fh, new)
            else:
                os.chmod(node.path, new)

    def chown(self, ctx: Context, node, st: os.stat_result, uid: int, gid: int) -> None:
        lower_uid = -1 if uid == UNCHANGED else self.uids.to_lower(uid)
        lower_gid = -1 if gid == UNCHANGED else self.gids.to_lower(gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "id has no lower counterpart")
        policy.check_chown(st, self.uids, self.gids, ctx.uid, lower_uid, lower_gid)
        mode = st.st_mode
        if (not stat.S_ISDIR(mode) and policy.setid_always_cleared(mode)
                and (policy.is_frozen(st, self.uids, self.gids)
                     or not self.callers.owns(ctx, st))):
            # the set-uid (or group-exec set-gid) bit a chown clears is a
            # mode change, which notify_change lets only the owner (or
            # CAP_FOWNER over a mapped inode) make; with
            # FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that check to us
            raise OSError(errno.EPERM, "chown: set-id bits need clearing by the owner")
        drop_sgid = bool(st.st_mode & stat.S_ISGID) and self.callers.chown_drops_sgid(ctx, st)
        if (drop_sgid and lower_uid == -1 and lower_gid == -1
                and not self.callers.owns(ctx, st)):
            # clearing the bit is a mode change, which only the owner may
            # make (a write's clearing comes as the same empty SETATTR, and
            # is forced)
            raise OSError(errno.EPERM, "chown: set-gid bit needs clearing by the owner")
        linux.chown_fd(node.fd, lower_uid, lower_gid)
        if drop_sgid:
            os.chmod(node.path, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

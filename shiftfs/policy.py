"""Kernel-exact decisions that are not a plain syscall on the lower tree.

A kernel idmapped mount treats an inode whose lower uid or gid has no upper
counterpart as *frozen*: the mount shows it (as the overflow id) but will
not change it, and capabilities do not override that. shiftfs shows such
an id as (uid_t)-1, which the FUSE client holds as INVALID_UID (stat shows
the overflow id): the client's own checks (``inode_permission``,
``notify_change``, ``capable_wrt_inode_uidgid``) then refuse as on an
idmapped mount, before any request. A FUSE daemon running as root would
pass the kernel's checks on the lower, so the daemon also refuses what
reaches it here, with the errno and in the order the kernel's VFS uses
(measured against a real idmapped mount by tests/oracle/test_differential.py):

- writing to a frozen inode -- open for write, truncate, utimes to "now",
  and creating, linking, renaming or removing names in a frozen directory --
  is EACCES (``inode_permission``: MAY_WRITE on an inode with an unmapped id);
- any other attribute change (chmod, explicit times, chown that leaves an
  unmapped id in place) is EOVERFLOW (``notify_change``);
- setting or removing an xattr is EPERM (``xattr_permission``);
- removing, renaming, linking or replacing a frozen inode is EOVERFLOW
  (``may_delete``, ``may_linkat``), checked before the directory;
- a caller whose fsuid or fsgid has no lower id cannot create a name (new
  entry, link, rename onto a free name): EOVERFLOW (``may_create``), checked
  before the directory.

Reading, listing, searching and executing a frozen inode are decided by the
mode bits and the ACL alone (``acl_permission_check``): the owner class
applies only to a caller whose fsuid is the inode's *mapped* owner, the
group class only to members of its *mapped* group, ACL entries only to the
ids they map to, and no capability overrides (``capable_wrt_inode_uidgid``
needs both ids mapped): the FUSE client decides so itself, and the daemon
with ``frozen_permitted`` for the requests that reach it.

Pure functions over lower ``os.stat_result`` values and the tables: testable
as a table of cases without a mount (tests/test_policy.py).
"""

from __future__ import annotations

import errno
import os
import stat

from . import xattrs
from .idmap import IdTable, parse_proc_map

# errno the kernel gives for each kind of change to a frozen inode
FROZEN_ERRNO = {
    "write": errno.EACCES,     # open for writing, truncate; MAY_WRITE on a directory
    "utimes": errno.EACCES,    # utimes(NULL) / both UTIME_NOW: a write permission check
    "chmod": errno.EOVERFLOW,  # any other setattr: notify_change refuses
    "setxattr": errno.EPERM,   # xattr_permission
    "unlink": errno.EOVERFLOW,  # may_delete on the victim
    "rename": errno.EOVERFLOW,  # may_delete on the source (and on a replaced target)
    "link": errno.EOVERFLOW,   # may_linkat on the source
}

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def is_frozen(st: os.stat_result, uids: IdTable, gids: IdTable) -> bool:
    return uids.to_upper(st.st_uid) is None or gids.to_upper(st.st_gid) is None


MAY_EXEC, MAY_WRITE, MAY_READ = 1, 2, 4
FMODE_EXEC = 0x20  # __FMODE_EXEC: in the open flags of an execve's open


def open_want(flags: int) -> int:
    """The access an OPEN request asks for (read, or exec for an execve)."""
    if flags & FMODE_EXEC:
        return MAY_EXEC
    acc = flags & os.O_ACCMODE
    return (MAY_READ if acc != os.O_WRONLY else 0) | (MAY_WRITE if acc != os.O_RDONLY else 0)


def frozen_permitted(st: os.stat_result, uids: IdTable, gids: IdTable, caller_uid: int,
                     caller_groups, want: int, acl: bytes | None = None) -> bool:
    """acl_permission_check on an idmapped mount, for the caller's (upper)
    fsuid and groups (fsgid included), with no capability override: what
    the kernel decides for an inode whose owner or group is unmapped.
    ``acl`` is the raw lower ``system.posix_acl_access`` value, if any."""
    mode = st.st_mode
    owner = uids.to_upper(st.st_uid)
    if owner is not None and owner == caller_uid:
        return not want & ~(mode >> 6) & 7
    group = gids.to_upper(st.st_gid)
    if acl is not None and mode & 0o070:
        verdict = _acl_permitted(acl, group, uids, gids, caller_uid, caller_groups, want)
        if verdict is not None:
            return verdict
    if want & (mode ^ (mode >> 3)) & 7 and group is not None and group in caller_groups:
        mode >>= 3
    return not want & ~mode & 7


def _acl_permitted(acl: bytes, group: int | None, uids: IdTable, gids: IdTable, caller_uid: int,
                   caller_groups, want: int) -> bool | None:
    """posix_acl_permission past the owner (checked by the caller): None if
    the value is not a valid ACL (then the mode bits decide)."""
    try:
        entries = xattrs.acl_entries(acl)
    except OSError:
        return None
    mask = next((perm for tag, perm, _ in entries if tag == xattrs.ACL_MASK), 7)
    found = False
    for tag, perm, ident in entries:
        if tag == xattrs.ACL_USER:
            if uids.to_upper(ident) == caller_uid:
                return not want & ~(perm & mask)
        elif tag in (xattrs.ACL_GROUP_OBJ, xattrs.ACL_GROUP):
            gid = group if tag == xattrs.ACL_GROUP_OBJ else gids.to_upper(ident)
            if gid is not None and gid in caller_groups:
                found = True
                if not want & ~perm:
                    return not want & ~(perm & mask)
        elif tag == xattrs.ACL_OTHER:
            return False if found else not want & ~perm
    return None


def check_modify(st: os.stat_result, uids: IdTable, gids: IdTable, what: str) -> None:
    """Raise the kernel's errno if ``what`` may not change this inode."""
    if is_frozen(st, uids, gids):
        code = FROZEN_ERRNO[what]
        raise OSError(code, f"{what}: inode has an unmapped owner")


def check_dir_write(parent: os.stat_result, uids: IdTable, gids: IdTable) -> None:
    """Adding or removing a name in a directory writes the directory."""
    if is_frozen(parent, uids, gids):
        raise OSError(errno.EACCES, "directory has an unmapped owner")


def check_create(caller_mapped: bool, parent: os.stat_result, uids: IdTable, gids: IdTable) -> None:
    """may_create: the caller must own something down there, then the
    directory must be writable."""
    if not caller_mapped:
        raise OSError(errno.EOVERFLOW, "caller has no lower id")
    check_dir_write(parent, uids, gids)


def check_delete(victim: os.stat_result, parent: os.stat_result, uids: IdTable, gids: IdTable,
                 what: str = "unlink") -> None:
    """may_delete: a frozen victim first (EOVERFLOW), then the directory."""
    check_modify(victim, uids, gids, what)
    check_dir_write(parent, uids, gids)


def check_link(source: os.stat_result, caller_mapped: bool, parent: os.stat_result,
               uids: IdTable, gids: IdTable) -> None:
    """may_linkat on the source, then may_create for the new name."""
    check_modify(source, uids, gids, "link")
    check_create(caller_mapped, parent, uids, gids)


def check_rename(old: os.stat_result, old_parent: os.stat_result, new: os.stat_result | None,
                 new_parent: os.stat_result, caller_mapped: bool,
                 uids: IdTable, gids: IdTable) -> None:
    """vfs_rename: may_delete(old), then may_create(new) for a free name or
    may_delete(new) for one that is replaced (or exchanged)."""
    check_delete(old, old_parent, uids, gids, "rename")
    if new is None:
        check_create(caller_mapped, new_parent, uids, gids)
    else:
        check_delete(new, new_parent, uids, gids, "rename")


def utimes_kind(atime_nsec: int | None, mtime_nsec: int | None) -> str:
    """"utimes" (a write check) when both times are "now" -- utimes(NULL) --
    else "chmod" (an attribute change). None means no times given."""
    if atime_nsec is None or (atime_nsec == UTIME_NOW and mtime_nsec == UTIME_NOW):
        return "utimes"
    return "chmod"


def check_chown(st: os.stat_result, uids: IdTable, gids: IdTable, caller_uid: int,
                new_uid: int = -1, new_gid: int = -1) -> None:
    """notify_change + chown_ok for a chown the upper kernel has allowed.

    ``new_uid``/``new_gid`` are lower ids or -1 (unchanged). An id left
    unchanged must already be mapped (EOVERFLOW even for host root); only
    host root may give a frozen inode mapped owners back."""
    if new_uid == -1 and uids.to_upper(st.st_uid) is None:
        raise OSError(errno.EOVERFLOW, "chown: owner stays unmapped")
    if new_gid == -1 and gids.to_upper(st.st_gid) is None:
        raise OSError(errno.EOVERFLOW, "chown: group stays unmapped")
    if caller_uid != 0 and is_frozen(st, uids, gids):
        raise OSError(errno.EOVERFLOW, "chown: inode has an unmapped owner")


def setid_always_cleared(mode: int) -> bool:
    """Set-uid, or set-gid with group exec: the bits any write or chown by
    a caller without CAP_FSETID clears, whatever its groups
    (should_remove_suid)."""
    return bool(mode & stat.S_ISUID) or \
        mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID | stat.S_IXGRP


def chown_drops_sgid(st: os.stat_result, caller_in_group: bool, caller_capable: bool) -> bool:
    """setattr_should_drop_sgid for a chown: a set-gid file without group
    exec loses S_ISGID when the caller is neither in its group nor holds
    CAP_FSETID over it. (With group exec the upper kernel already sends the
    chmod itself; for directories chown never touches S_ISGID.)"""
    mode = st.st_mode
    return (not stat.S_ISDIR(mode) and bool(mode & stat.S_ISGID) and not mode & stat.S_IXGRP
            and not caller_in_group and not caller_capable)


def killed_suidgid_mode(mode: int, keep_sgid_without_xgrp: bool) -> int:
    """The permission bits left after a write or truncate by a caller
    without CAP_FSETID (setattr_should_drop_suidgid): set-uid goes; set-gid
    goes with group exec, and without it unless the caller is in the
    file's group or holds CAP_FSETID over it (``keep_sgid_without_xgrp``)."""
    new = stat.S_IMODE(mode) & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not keep_sgid_without_xgrp):
        new &= ~stat.S_ISGID
    return new


def parse_cap_eff(status_text: str) -> int:
    """The CapEff mask from /proc/PID/status text (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def id_in_map(map_text: str, ident: int) -> bool:
    """Is ``ident`` (as this process sees ids) inside some line
    "inside outside count" of a /proc/PID/{uid,gid}_map read from here?
    (The outside column is the upper side of idmap's extents.)"""
    return any(e.upper <= ident <= e.upper_end for e in parse_proc_map(map_text))


def xattr_read_needs_permission(name) -> bool:
    """xattr_permission for a read: only user.* names ask inode_permission
    (MAY_READ); security.*, system.* and trusted.* do not."""
    return (name if isinstance(name, bytes) else name.encode()).startswith(b"user.")

"""Kernel-exact decisions that are not a plain syscall on the lower tree.

A kernel idmapped mount treats an inode whose lower uid or gid has no upper
counterpart as *frozen*: the mount shows it (as the overflow id) but will
not change it, and capabilities do not override that. A FUSE daemon running
as root passes the kernel's own checks for such inodes (the upper kernel
sees an ordinary owner, 65534), so the daemon refuses them here, with the
errno and in the order the kernel's VFS uses (measured against a real
idmapped mount by tests/oracle/test_differential.py):

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

Pure functions over lower ``os.stat_result`` values and the tables: testable
as a table of cases without a mount (tests/test_policy.py).
"""

from __future__ import annotations

import errno
import os
import stat

from .idmap import IdTable

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


def chown_drops_sgid(st: os.stat_result, caller_in_group: bool, caller_capable: bool) -> bool:
    """setattr_should_drop_sgid for a chown: a set-gid file without group
    exec loses S_ISGID when the caller is neither in its group nor holds
    CAP_FSETID over it. (With group exec the upper kernel already sends the
    chmod itself; for directories chown never touches S_ISGID.)"""
    mode = st.st_mode
    return (not stat.S_ISDIR(mode) and bool(mode & stat.S_ISGID) and not mode & stat.S_IXGRP
            and not caller_in_group and not caller_capable)


def parse_cap_eff(status_text: str) -> int:
    """The CapEff mask from /proc/PID/status text (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def id_in_map(map_text: str, ident: int) -> bool:
    """Is ``ident`` (as this process sees ids) inside some line
    "inside outside count" of a /proc/PID/{uid,gid}_map read from here?"""
    for line in map_text.splitlines():
        fields = line.split()
        if len(fields) == 3:
            _inside, outside, count = (int(f) for f in fields)
            if outside <= ident < outside + count:
                return True
    return False

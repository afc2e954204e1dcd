"""Kernel-exact decisions that are not a plain syscall on the lower tree.

A kernel idmapped mount treats an inode whose lower uid or gid has no upper
counterpart as *frozen*: the mount shows it (as the overflow id) but will
not change it, and capabilities do not override that. A FUSE daemon running
as root passes the kernel's own checks for such inodes (the upper kernel
sees an ordinary owner, 65534), so the daemon refuses them here.

Pure functions over a lower ``os.stat_result`` and the tables: testable as a
table of cases without a mount.
"""

from __future__ import annotations

import errno
import os

from .idmap import IdTable

# errno the kernel gives for each kind of change to a frozen inode
FROZEN_ERRNO = {
    "write": errno.EACCES,     # open for writing, truncate
    "utimes": errno.EACCES,    # utimes(NULL): a write permission check
    "chmod": errno.EOVERFLOW,  # any other setattr: notify_change refuses
    "setxattr": errno.EPERM,
    "unlink": errno.EOVERFLOW,
    "rename": errno.EOVERFLOW,
    "link": errno.EOVERFLOW,
}


def is_frozen(st: os.stat_result, uids: IdTable, gids: IdTable) -> bool:
    return uids.to_upper(st.st_uid) is None or gids.to_upper(st.st_gid) is None


def check_modify(st: os.stat_result, uids: IdTable, gids: IdTable, what: str) -> None:
    """Raise the kernel's errno if ``what`` may not change this inode."""
    if is_frozen(st, uids, gids):
        code = FROZEN_ERRNO[what]
        raise OSError(code, f"{what}: inode has an unmapped owner")


def check_chown(st: os.stat_result, uids: IdTable, gids: IdTable, caller_uid: int) -> None:
    """Only host root may give a frozen inode mapped owners back."""
    if caller_uid != 0 and is_frozen(st, uids, gids):
        raise OSError(errno.EOVERFLOW, "chown: inode has an unmapped owner")

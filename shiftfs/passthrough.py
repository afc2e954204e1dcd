"""Which opens are passed through (FUSE passthrough, Linux 6.9+, a daemon
with CAP_SYS_ADMIN): the kernel then does a regular file's reads and
writes on the lower file itself, and no READ or WRITE reaches the daemon.

Not for files whose writes the daemon must see: files with a set-uid bit
or a set-gid bit with group exec (a write clears them), files with a
security.capability (a write removes it). Frozen files are passed through:
the kernel decides their opens as an idmapped mount does (their unmapped
ids show as (uid_t)-1) and refuses every open of them for writing. Nor for lowers the kernel refuses as backing files
(stacked too deep: overlayfs, a second shiftfs), which the first refusal
shows. The choice is made at an inode's first open (InodeTable.opened).
"""

from __future__ import annotations

import errno
import logging
import os

from . import policy

log = logging.getLogger("shiftfs")


class Passthrough:
    """The backing files of a session INIT granted passthrough (``files``:
    its backing_open and backing_close), or none."""

    def __init__(self, files=None) -> None:
        self.files = files
        self._closer = files  # still gives back what was opened after a refusal

    def chooser(self, fd: int, st: os.stat_result, fresh: bool):
        """What InodeTable.opened calls at the first open of the inode
        ``fd`` holds, for its backing id (0: served by the daemon), or None
        where nothing is passed through. ``fresh``: a file this request
        made (it has no security.capability)."""
        if self.files is None:
            return None

        def choose() -> int:
            if policy.setid_always_cleared(st.st_mode):
                return 0
            if not fresh:
                try:
                    os.getxattr(fd, "security.capability")
                    return 0
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        return 0
            return self._open(fd)
        return choose

    def _open(self, fd: int) -> int:
        files = self.files
        if files is None:
            return 0
        try:
            return files.backing_open(fd)
        except OSError as e:
            if e.errno == errno.EPERM:  # no CAP_SYS_ADMIN after all: stop asking
                log.warning("passthrough refused (%s); reads and writes go through the daemon",
                            e.strerror)
                self.files = None
            return 0  # e.g. EINVAL: a lower on overlayfs is stacked too deep

    def close(self, backing_id: int) -> None:
        try:
            self._closer.backing_close(backing_id)
        except OSError as e:
            log.warning("passthrough backing file %d not given back: %s", backing_id, e.strerror)

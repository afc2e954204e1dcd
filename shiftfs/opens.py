"""The inode table's open files (InodeTable's other half, over its lock
and nodes): the lower fds held for callers' opens.

The files and directories callers have open hold lower fds too, which no
shrinker can give back; and RLIMIT_NOFILE is the daemon's, shared by every
caller. So they are counted per caller uid (``admit``, ``opened``,
``dir_opened``, ``closed``): all together may hold ``OPEN_BUDGET`` of the
limit (ENFILE past it; with the nodes' 60 % that leaves room for the rest),
and one uid a quarter of that (EMFILE past it). A user that holds files
until refused is refused long before the others are, and 3/4 of the budget
stays theirs. A quarter is still more open files than a user's own soft
limit usually allows (1,024) at any daemon limit above 14,000 (a root
daemon raises its own to fs.nr_open, 1,048,576 by default: 78,643 files
per uid). Several uids together (a container's root can take any id of
its range) can still use up the budget; each then meets ENFILE, as on a
system whose file table is full, while lookups and stats keep working.
A passed-through file's reads and writes never reach the daemon (the
kernel holds the backing file), but FSYNC, FALLOCATE, LSEEK (SEEK_DATA,
SEEK_HOLE), COPY_FILE_RANGE, and GETATTR and SETATTR of an open file
still come with its fh, so the fh must stay a real fd of that inode: the
opens of one passed-through inode with the same flags share one fd,
counted against the uid whose open made it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from .node import Node, OpenFile

OPEN_BUDGET = 0.3  # of RLIMIT_NOFILE: the fds all callers' open files may hold
OPEN_SHARE = 4  # one uid may hold 1/OPEN_SHARE of the budget
# flags that only matter while opening: opens that differ in them alone may share an fd
_OPENING = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_TRUNC | os.O_CLOEXEC
log = logging.getLogger("shiftfs")


class OpenFiles:
    """Counted per caller uid; InodeTable provides ``_lock``, ``journal``,
    ``store``, ``release_if_gone``, ``_droppable``, ``_park`` and ``_let_go``."""

    def _init_opens(self) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # as the mount raised it
        self.file_budget = max(int(limit * OPEN_BUDGET), OPEN_SHARE)
        self.file_share = self.file_budget // OPEN_SHARE
        self.file_fds = 0  # held for callers' open files and directories
        self._files: dict[int, OpenFile] = {}  # by fd (the fh the kernel has)
        self._uid_files: dict[int, int] = {}  # fds held for each caller uid
        self._shared: dict[tuple[int, int], OpenFile] = {}  # (node id, flags) -> passed-through fd

    def admit(self, uid: int) -> None:
        """Before a lower file or directory is opened (or made) for caller
        ``uid``: EMFILE if it holds its share of the daemon's fds for open
        files, ENFILE if all callers together hold the budget."""
        with self._lock:
            if self._uid_files.get(uid, 0) >= self.file_share:
                raise OSError(errno.EMFILE, f"uid {uid} holds its share of open files"
                                            f" ({self.file_share})")
            if self.file_fds >= self.file_budget:
                raise OSError(errno.ENFILE, f"callers hold the budget of open files"
                                            f" ({self.file_budget})")

    def _count(self, f: OpenFile) -> None:
        # under the lock
        self._files[f.fd] = f
        self._uid_files[f.uid] = self._uid_files.get(f.uid, 0) + 1
        self.file_fds += 1

    def opened(self, node: Node, fd: int, flags: int, uid: int, passthrough=None) -> tuple[int, int]:
        """A new open of ``node`` by caller ``uid`` on the lower ``fd``
        (opened with ``flags``; the table takes it): (fh, passthrough
        backing id, 0 for none). The kernel wants every open of an inode
        served the same way, by one backing file, while any is open; so
        only the first open chooses, by ``passthrough()`` (an id, or 0),
        and the others follow it. A passed-through open shares the fd of
        an earlier one with the same flags: fd is closed, and that one's is
        the fh."""
        try:
            with self._lock:
                if not node.opens and passthrough is not None:
                    node.backing = passthrough()
                    if node.backing and self.journal is not None:
                        self.journal.put(node)
                node.opens += 1
                backing = node.backing
                shared = (node.node_id, flags & ~_OPENING) if backing else None
                f = self._shared.get(shared) if shared else None
                if f is not None:
                    f.opens += 1
                    if self.store is not None:
                        self.store.shared(f.fd)
                else:
                    f = OpenFile(fd, node, uid, shared)
                    self._count(f)
                    if shared:
                        self._shared[shared] = f
                    if self.store is not None:
                        self.store.held(fd, node.node_id, uid, flags)
                    fd = -1
        except BaseException:
            os.close(fd)
            raise
        if fd >= 0:
            os.close(fd)
        return f.fd, backing

    def dir_opened(self, fd: int, uid: int, node_id: int) -> None:
        """A lower directory ``fd`` held for caller ``uid``'s OPENDIR of
        node ``node_id``."""
        with self._lock:
            self._count(OpenFile(fd, None, uid, None, node_id))
            if self.store is not None:
                self.store.held(fd, node_id, uid, os.O_DIRECTORY)

    def handed_out(self, fh: int, node_id: int, directory: bool) -> bool:
        """Whether ``fh`` is an open file (or directory) of node ``node_id``
        that the daemon handed out and has not closed: a request's fh is
        used as an fd, and any other number would reach whatever the
        daemon holds under it (fd 0, a node's O_PATH fd, another caller's
        file)."""
        f = self._files.get(fh)
        return f is not None and f.node_id == node_id and (f.node is None) == directory

    def closed(self, fh: int, unregister=None, node_id: int | None = None) -> None:
        """A RELEASE or RELEASEDIR of ``fh``: its fd is closed once no open
        uses it. A file's last open may free its inode, and gives its
        backing id back by ``unregister(id)``. Not sooner: an open answered
        with the id looks it up after the reply, and its RELEASE (which
        comes after that) is what keeps the count up."""
        with self._lock:
            f = self._files.get(fh)
            if f is None:  # never ours: an fd number must not be closed on a guess
                log.warning("RELEASE of fh %d, which no open holds", fh)
                return
            if node_id is not None and f.node_id != node_id:
                log.warning("RELEASE of fh %d for node %d, which is node %d's", fh, node_id,
                            f.node_id)
                return
            f.opens -= 1
            unused = not f.opens
            # from the fd about to go: a last close of a file with no link frees its inode
            links = os.fstat(fh).st_nlink if unused and f.node is not None else 1
            if self.store is not None:  # before the fd goes: a resent RELEASE finds no fh
                self.store.released(fh, now=not links)
            if unused:
                del self._files[fh]
                self.file_fds -= 1
                left = self._uid_files.pop(f.uid) - 1
                if left:
                    self._uid_files[f.uid] = left
                if f.shared:
                    del self._shared[f.shared]
            node, backing, last = f.node, 0, False
            if node is not None:
                node.opens -= 1
                last = not node.opens
                if last:
                    backing, node.backing = node.backing, 0
                    if backing and self.journal is not None and node.slot >= 0:
                        self.journal.put(node)
        if unused:
            os.close(fh)
        if not last:
            return
        if backing and unregister is not None:
            unregister(backing)
        self.release_if_gone(node, links)
        if node.nlookup <= 0 and self._droppable(node):  # again under the lock
            with self._lock:
                done = []
                if node.nlookup <= 0 and self._droppable(node):  # a file with no link: not kept
                    done = self._park(node) if links and not node.nlookup else [self._let_go(node)]
            for gone in done:
                self._forgotten(*gone)

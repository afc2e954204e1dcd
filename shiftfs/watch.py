"""Invalidations the daemon sends to the kernel on its own.

The watcher sees changes made behind the mount -- directly on the lower,
or through another mount of the same lower (the sharing use case) -- with
fanotify on the lower's filesystem (FAN_MARK_FILESYSTEM, reporting file
handles and names; needs CAP_SYS_ADMIN), and turns each one into an
invalidation of the nodes it touches: an inode's attributes or data
changed -> notify_inval_inode; a name created, removed or moved in a
known directory -> notify_inval_entry for the name and notify_inval_inode
for the directory. Changes the daemon itself made (through this mount,
which the kernel knows already) carry its pid and are skipped. A queue
overflow invalidates every node and name the daemon knows.

The shrinker keeps the daemon's fds bounded: past the table's high mark,
nodes that no running request names and nothing has open give their fd
back, least recently named first (inodes.give_back; they are reopened by
file handle when next named); only where that gives too few (no file
handles on the lower, or most nodes open), it asks the kernel to forget the
oldest nodes (FUSE_NOTIFY_PRUNE, Linux 6.18: it drops only names nothing
uses, so never a mount point; the kernel then FORGETs them). Before 6.18
it can only expire their names, which never detaches anything and frees
little. A dropped name costs one LOOKUP the next time it is used.
"""

from __future__ import annotations

import logging
import os
import threading

from . import linux

log = logging.getLogger("shiftfs")


class Shrinker:
    def __init__(self, table, session) -> None:
        self.table, self.session = table, session
        self.rounds = 0
        self.asked = 0
        self._after = 0
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="shiftfs-shrinker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        table = self.table
        while True:
            table.shrink_wanted.wait()
            table.shrink_wanted.clear()
            try:
                self.shrink()
            except Exception:  # noqa: BLE001 (never take the mount down)
                log.exception("shrinking the inode table failed")

    def shrink(self) -> None:
        table = self.table
        excess = table.open_fds - table.low
        if excess <= 0:
            return
        self.rounds += 1
        excess -= table.give_back(excess)
        if excess <= 0:
            return
        # too few to give back (no handles, or open): make the kernel forget the oldest;
        # a cursor, so nodes the kernel cannot drop (busy) do not stop the
        # shrinker from reaching newer ones
        batch = table.oldest(excess, self._after)
        self._after = batch[-1][0] if len(batch) == excess else 0
        session = self.session
        if getattr(session, "can_prune", False):  # a session without prune() never can
            for i in range(0, len(batch), 512):
                session.prune([node_id for node_id, _parent, _name in batch[i:i + 512]])
            self.asked += len(batch)
            return
        if not self._warned:
            self._warned = True
            log.warning("%d fds held: this kernel cannot be asked to forget nodes without detaching"
                        " what is mounted on them (FUSE_NOTIFY_PRUNE, Linux 6.18); only their names"
                        " are expired", table.open_fds)
        if session.expire_only:
            for _node_id, parent_id, name in batch:
                session.inval_entry(parent_id, name, expire_only=True)
                self.asked += 1


_MASK = (linux.FAN_MODIFY | linux.FAN_ATTRIB | linux.FAN_CREATE | linux.FAN_DELETE
         | linux.FAN_MOVED_FROM | linux.FAN_MOVED_TO | linux.FAN_DELETE_SELF
         | linux.FAN_MOVE_SELF | linux.FAN_ONDIR)
_DIRENT = linux.FAN_CREATE | linux.FAN_DELETE | linux.FAN_MOVED_FROM | linux.FAN_MOVED_TO
_DIR_INFOS = (linux.FAN_INFO_DFID_NAME, linux.FAN_INFO_OLD_DFID_NAME, linux.FAN_INFO_NEW_DFID_NAME,
              linux.FAN_INFO_DFID)


class Watcher:
    """fanotify on the lower filesystem -> kernel cache invalidations.
    ``Watcher.start`` raises OSError where fanotify cannot be had (no
    CAP_SYS_ADMIN, a filesystem without file handles, an old kernel)."""

    def __init__(self, table, session, lower: str) -> None:
        self.table, self.session = table, session
        self.events = 0
        self.invalidations = 0
        self.overflows = 0
        self._pid = os.getpid()
        self._fd = linux.fanotify_init(linux.FAN_CLOEXEC | linux.FAN_REPORT_FID
                                       | linux.FAN_REPORT_DIR_FID | linux.FAN_REPORT_NAME)
        try:
            linux.fanotify_mark(self._fd, linux.FAN_MARK_ADD | linux.FAN_MARK_FILESYSTEM, _MASK, lower)
        except OSError:
            os.close(self._fd)
            raise
        # open_by_handle_at wants a real (not O_PATH) fd on the filesystem
        self._mount_fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="shiftfs-watcher", daemon=True)

    def start(self) -> None:
        self._pid = os.getpid()  # after a daemonizing fork
        self._thread.start()

    def _node_of(self, handle: bytes):
        try:
            fd = linux.open_by_handle(self._mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return None  # gone, or on another filesystem
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return self.table.find(st.st_dev, st.st_ino)

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                log.exception("fanotify read failed: changes behind the mount now show within the timeouts only")
                return
            for mask, pid, infos in linux.fanotify_events(data):
                try:
                    self._handle(mask, pid, infos)
                except Exception:  # noqa: BLE001 (never take the mount down)
                    log.exception("fanotify event failed")

    def _handle(self, mask: int, pid: int, infos) -> None:
        self.events += 1
        if mask & linux.FAN_Q_OVERFLOW:
            self.overflows += 1
            self.invalidate_all()
            return
        if pid == self._pid:
            return  # made through this mount: the kernel knows already
        session = self.session
        dirent = mask & _DIRENT
        for kind, handle, name in infos:
            if kind in _DIR_INFOS:
                if not dirent:
                    # a directory's own change comes as its fid with the name
                    # "." (FAN_REPORT_NAME); a child's, with the child's name
                    # and a record of its own, which says what changed
                    if name in (b".", b""):
                        node = self._node_of(handle)
                        if node is not None:
                            session.inval_inode(node.node_id)
                            self.invalidations += 1
                    continue
                if not name:
                    continue
                node = self._node_of(handle)
                if node is not None:
                    session.inval_entry(node.node_id, name)
                    session.inval_inode(node.node_id)
                    self.invalidations += 2
            elif kind == linux.FAN_INFO_FID:
                node = self._node_of(handle)
                if node is not None:
                    session.inval_inode(node.node_id)
                    self.invalidations += 1

    def invalidate_all(self) -> None:
        for node in self.table.nodes():
            self.session.inval_inode(node.node_id)
            if node.name:
                self.session.inval_entry(node.parent_id, node.name)

"""Invalidations the daemon sends to the kernel on its own.

The watcher sees changes made behind the mount -- directly on the lower,
or through another mount of the same lower (the sharing use case) -- with
fanotify **inode marks** on what the kernel holds: every directory node
(FAN_EVENT_ON_CHILD, so a mark also reports its children's attribute and
data changes) and the few other nodes a directory's mark does not cover (a
file with more than one link, which may change through a directory nobody
watches; a file moved out of a watched directory while the kernel holds
it). Marks are added when the kernel first looks a node up and removed
when it forgets it (InodeTable calls ``added`` and ``forgotten``), so a
writer elsewhere on the lower's filesystem wakes nothing here. Such marks
need no privilege since Linux 5.13 (reporting file handles, which an
unprivileged listener must), so rootless daemons watch too. Events are
matched to nodes by file handle (fsid and struct file_handle, as
name_to_handle_at gives them), kept for every node the kernel holds.

What an event becomes:
- attributes or data of a node changed (its own event, or a child's on its
  directory's mark) -> inval_inode;
- a name created, moved in or moved away -> inval_entry with EXPIRE_ONLY
  (the kernel looks the name up again at its next use, and a mount on it
  stays: a directory renamed behind the mount keeps its mounts until its old
  name is looked up again, and that lookup finds it gone) and inval_inode
  of the directory (its attributes and cached listing);
- a name removed that is still gone -> FUSE_NOTIFY_DELETE (or a plain
  inval_entry): the kernel drops it and what is mounted on it, as a local
  filesystem does for an unlink in another mount namespace;
- a queue overflow -> every node's attributes and every name the daemon
  handed out (negative ones included) expired, nothing detached.
Changes the daemon itself made (through this mount, which the kernel knows
already) carry its pid and are passed over unparsed; after a read that held
nothing else the reader sleeps 10 ms, so the daemon's own bursts (an untar
through the mount) are read in few wakeups, and the kernel merges repeated
events meanwhile. Other events are read at once. On kernels without
FUSE_EXPIRE_ONLY (before Linux 6.2) names are never invalidated (that
would detach mounts): they get the short lifetimes, and the watcher sends
inode invalidations only. Where marks run out (fs.fanotify.max_user_marks),
the nodes beyond get the short lifetimes (cache.CachePolicy decides by
``node.marked``), with one log line.

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

import errno
import logging
import os
import stat
import threading
import time

from . import linux
from .node import handle_id
from .parking import PARK_SECONDS

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
        parked = False
        while True:
            # every PARK_SECONDS while nodes are parked: a parked fd holds a
            # file replaced behind the mount until then (parking.py)
            table.shrink_wanted.wait(PARK_SECONDS if parked else None)
            table.shrink_wanted.clear()
            try:
                parked = table.unpark_old()
                self.ask_held()
                self.shrink()
            except Exception:  # noqa: BLE001 (never take the mount down)
                log.exception("shrinking the inode table failed")

    def ask_held(self) -> None:
        """Files known by their ids that a FORGET dropped with a mark of their
        own (a second link): the kernel may hold them still, under a
        lookup that raced the FORGET, where their count began after the
        kernel's. The watcher asks (notifications: never on the request
        path) and marks again those the kernel holds (Watcher._cover)."""
        dropped, watch = self.table.dropped_marked, self.table.watch
        while dropped:
            node = dropped.pop()
            if watch is not None and watch.session is not None:
                watch._cover(node)

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


_FILE_MASK = (linux.FAN_MODIFY | linux.FAN_ATTRIB | linux.FAN_DELETE_SELF | linux.FAN_MOVE_SELF)
_DIR_MASK = (_FILE_MASK | linux.FAN_CREATE | linux.FAN_DELETE | linux.FAN_MOVED_FROM
             | linux.FAN_MOVED_TO | linux.FAN_ONDIR | linux.FAN_EVENT_ON_CHILD)
_DIRENT = linux.FAN_CREATE | linux.FAN_DELETE | linux.FAN_MOVED_FROM | linux.FAN_MOVED_TO
_DIR_INFOS = (linux.FAN_INFO_DFID_NAME, linux.FAN_INFO_OLD_DFID_NAME, linux.FAN_INFO_NEW_DFID_NAME,
              linux.FAN_INFO_DFID)
_SELF = (b".", b"")
# filesystems changed where fanotify does not see it (another host, a FUSE
# daemon's own backend): never watched, their nodes keep the short lifetimes
_REMOTE = ("fuse", "nfs", "cifs", "smb", "9p", "ceph", "virtiofs", "afs", "glusterfs", "lustre",
           "gfs2", "ocfs2")
BATCH_SECONDS = 0.01  # after a read of only the daemon's own events: let more gather
# names handed out with long lifetimes that no node records, expired on an
# overflow: absent names, and files known by their handle ids with the ids
# (~120 bytes each); absent ones cost a caller nothing to make: fewer of them
NAMES_KEPT = 1_000_000
ABSENT_KEPT = 100_000
_OVERFLOW_LOG_EVERY = 60.0


class Watcher:
    """fanotify inode marks on what the kernel holds -> kernel cache
    invalidations. The constructor raises OSError where fanotify cannot be
    had (an old kernel, a lower without file handles). It tells ``table``
    of itself; ``start(session)`` sends its invalidations through
    ``session`` from then on."""

    def __init__(self, table) -> None:
        self.table, self.session = table, None
        self.events = 0
        self.invalidations = 0
        self.overflows = 0
        self.marks = 0
        self.running = True
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._by_fid: dict[bytes, dict[bytes, object]] = {}  # fsid -> handle -> node
        self._marked: dict[int, int] = {}  # inode key -> nodes relying on its mark
        self._fsids: dict[int, bytes] = {}
        self._devs: dict[bytes, int | None] = {}  # fsid -> its one device (None: more than one)
        self._full = False  # marks ran out: try again once one was removed
        self._unmarkable: set[int] = set()  # devices whose inodes are not marked
        self._fid_flag = linux.AT_HANDLE_FID
        self._names: dict[int, dict[bytes, int]] = {}  # parent id -> name -> handle id (or 0)
        self._name_count = 0
        self._absent_count = 0  # of them, absent names (id 0)
        self._last_overflow_log = 0.0
        base = linux.FAN_CLOEXEC | linux.FAN_REPORT_FID | linux.FAN_REPORT_DIR_FID | linux.FAN_REPORT_NAME
        try:  # TARGET_FID (5.17): a removal names the node it removed
            self._fd = linux.fanotify_init(base | linux.FAN_REPORT_TARGET_FID)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fd = linux.fanotify_init(base)
        root = table.root
        try:
            kind = linux.fs_type(root.dev)
            if kind.startswith(_REMOTE):
                raise OSError(errno.ENODEV, f"a {kind} lower changes where fanotify does not see it")
            linux.fanotify_mark(self._fd, linux.FAN_MARK_ADD, _DIR_MASK, ".", root.fd)
            if self._index(root, root.fd) is None:
                raise OSError(errno.EOPNOTSUPP, "the lower has no file handles")
        except OSError:
            os.close(self._fd)
            raise
        self._marked[root.key] = 1
        self.marks = 1
        root.marked = True
        table.watch = self
        self._thread = threading.Thread(target=self._run, name="shiftfs-watcher", daemon=True)

    def start(self, session) -> None:
        self.session = session
        self._pid = os.getpid()  # after a daemonizing fork
        self._thread.start()

    # ---- the marks follow the table (called by InodeTable) ----
    def added(self, node, st: os.stat_result) -> None:
        """A node the kernel now holds, its fd open (the request holds it)."""
        fid = self._index(node, node.fd)
        if fid is not None and (stat.S_ISDIR(st.st_mode) or st.st_nlink > 1):
            self._mark(node, stat.S_ISDIR(st.st_mode))

    def forgotten(self, node, fd: int) -> None:
        """A node the kernel forgot; ``fd`` still open (or -1: given back)."""
        with self._lock:
            nodes = self._by_fid.get(self._fsids.get(node.dev, b""))
            if node.fid is not None and nodes and nodes.get(node.fid) is node:
                del nodes[node.fid]
            names = self._names.pop(node.node_id, None)
            if names:
                self._name_count -= len(names)
                self._absent_count -= sum(not i for i in names.values())
        if node.marked:
            self._unmark(node, fd)

    def _index(self, node, fd: int) -> bytes | None:
        """Index ``node`` by its fid, as fanotify will name it: its handle
        under its filesystem's fsid (``node.fid`` is the handle alone, the
        same bytes as ``node.handle`` where it has one: no copy a node)."""
        dev = node.dev
        fsid = self._fsids.get(dev)
        if fsid is None:
            fid = linux.fid_of(fd, node.handle)
            if fid is None:
                return None
            fsid = self._fsids[dev] = fid[:8]
            handle = node.handle or fid[8:]
            kind = linux.fs_type(dev)
            if kind.startswith(_REMOTE):
                self._unmarkable.add(dev)
                log.warning("a %s filesystem is changed where fanotify does not see it: names and"
                            " attributes on it get the short lifetimes", kind)
        else:
            handle = node.handle
            if handle is None:
                handle = linux.name_to_handle(fd, self._fid_flag)
                if handle is None and self._fid_flag:  # before Linux 6.5
                    self._fid_flag = 0
                    handle = linux.name_to_handle(fd)
                if handle is None:
                    return None
        node.fid = handle
        one = self._devs.setdefault(fsid, dev)
        if one == dev and linux.handle_ino(handle) is not None:
            return handle  # found by its number (_find): no index entry
        indexed = [node]
        if one is not None and one != dev:  # two devices, one fsid: by the index only, all
            self._devs[fsid] = None
            indexed += [n for n in self.table.nodes()
                        if n.fid is not None and self._fsids.get(n.dev) == fsid]
        with self._lock:
            nodes = self._by_fid.get(fsid)
            if nodes is None:
                nodes = self._by_fid[fsid] = {}
            for n in indexed:
                nodes[n.fid] = n
        return handle

    def _find(self, fid: bytes):
        """The node an event's fid (fsid and handle) names, or None. An
        ext4 or xfs handle (FILEID_INO32_GEN) holds the inode's number: the
        table's node of that number is it if their handles agree (an index
        entry a node would cost ~50 bytes, 10 MB over 200,000 nodes)."""
        nodes = self._by_fid.get(fid[:8])
        if nodes is not None:
            node = nodes.get(fid[8:])
            if node is not None:
                return node
        ino = linux.handle_ino(fid[8:])
        if ino is not None:
            dev = self._devs.get(fid[:8])
            if dev is not None:
                node = self.table.find(dev, ino)
                if node is not None and node.fid == fid[8:]:  # and its generation
                    return node
                return self.table.unkept(dev, fid[8:])  # a file the kernel holds by its handle id
        return None

    def _mark(self, node, is_dir: bool) -> bool:
        """An inode mark on ``node`` (its fd open); whether it has one now."""
        if node.dev in self._unmarkable:
            return False
        with self._lock:
            count = self._marked.get(node.key, 0)
            if count:
                self._marked[node.key] = count + 1
                node.marked = True
                return True
            if self._full:
                return False
            try:
                if is_dir:
                    linux.fanotify_mark(self._fd, linux.FAN_MARK_ADD, _DIR_MASK, ".", node.fd)
                else:
                    linux.fanotify_mark(self._fd, linux.FAN_MARK_ADD, _FILE_MASK,
                                        f"/proc/self/fd/{node.fd}")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self._full = True
                    log.warning("fanotify marks ran out at %d (fs.fanotify.max_user_marks): names and"
                                " attributes of nodes beyond them get %s lifetimes", self.marks,
                                "the short")
                elif e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.ENODEV, errno.EINVAL):
                    self._unmarkable.add(node.dev)
                    log.warning("cannot watch inodes on device %d:%d (%s): their names and attributes"
                                " get the short lifetimes", os.major(node.dev),
                                os.minor(node.dev), e.strerror)
                return False
            self._marked[node.key] = 1
            self.marks += 1
            node.marked = True
            return True

    def _unmark(self, node, fd: int, remove: bool = True) -> None:
        """``node`` relies on its mark no more; the last node of an inode
        removes it (``fd`` open, or -1: reopened by handle if it can be;
        ``remove`` False: the kernel dropped it with the deleted inode)."""
        own = -1
        if remove and fd < 0:  # it gave its fd back: the mark still holds the inode
            own = fd = self.table.reopen_fd(node)
        try:
            with self._lock:
                if not node.marked:
                    return
                node.marked = False
                count = self._marked.get(node.key, 0) - 1
                if count > 0:
                    self._marked[node.key] = count
                    return
                self._marked.pop(node.key, None)
                self.marks -= 1
                self._full = False
                if remove and fd >= 0:
                    try:
                        linux.fanotify_mark(self._fd, linux.FAN_MARK_REMOVE,
                                            _DIR_MASK if node.is_dir() else _FILE_MASK,
                                            "." if node.is_dir() else f"/proc/self/fd/{fd}", fd)
                    except OSError:
                        pass  # ENOENT: the inode was deleted, and its marks with it
        finally:
            if own >= 0:
                os.close(own)

    def _cover(self, node) -> None:
        """A mark of its own for a node no directory mark covers any more
        (a file moved out of its watched directory into one nobody watches,
        while the kernel holds it)."""
        if node.marked or node.is_dir():
            return
        kept = node.fd < 0 and self.table.peek(node.node_id) is not node  # a handle id, no node
        if kept:
            if self.session.inval_inode(node.node_id):
                return  # the kernel does not hold it
            try:
                node = self.table.keep(node.node_id)  # kept while marked, until its FORGET
            except OSError:
                return
        if not node.marked:  # (keep() marks a file with two links itself)
            self.table.with_fd(node, lambda _fd: self._mark(node, False))
        # its FORGET may have come before keep(), and found no node: asked
        # again, a kernel that holds no inode of it has no FORGET to send
        if kept and self.session.inval_inode(node.node_id):
            self.table.forget(node.node_id, 0)

    # ---- what ops asks ----
    def marks_every_directory(self, dev: int) -> bool:
        """Whether every directory of ``dev`` the kernel holds has a mark
        (not once marks ran out, nor on a device that cannot be marked)."""
        return not self._full and dev not in self._unmarkable

    def remember_name(self, parent, name: bytes, node_id: int = 0) -> bool:
        """A name handed out with a long lifetime that no node records (an
        absent one, or one of a file known by its handle id ``node_id``)
        is kept, with the id, to be expired after an overflow wherever the
        file went; False once too many are kept (the caller then gives it
        the short lifetime)."""
        with self._lock:
            names = self._names.get(parent.node_id)
            old = names.get(name) if names is not None else None
            if old is None and (self._name_count >= NAMES_KEPT
                                or not node_id and self._absent_count >= ABSENT_KEPT):
                return False
            if names is None:
                names = self._names[parent.node_id] = {}
            if old is None:
                self._name_count += 1
            self._absent_count += (not node_id) - (old == 0)
            names[name] = node_id
            return True

    # ---- the events ----
    def _run(self) -> None:
        linux.name_thread("shiftfs-watch")
        while True:
            try:
                data = os.read(self._fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                self.running = False  # ops gives the short lifetimes from now on
                log.exception("fanotify read failed: changes behind the mount now show within the"
                              " timeouts only")
                self.expire_all()
                return
            seen = self.events
            try:
                self._apply(linux.fanotify_events(data, self._pid))
            except Exception:  # noqa: BLE001 (never take the mount down)
                log.exception("fanotify events failed")
            if self.events == seen:  # only the daemon's own: let more of them gather
                time.sleep(BATCH_SECONDS)

    def _apply(self, events) -> None:
        find = self._find
        inodes: dict[int, object] = {}  # once each per read, after the names
        moved: dict[int, object] = {}  # moved away, and not (yet) into a watched directory
        for mask, _pid, infos in events:
            self.events += 1
            if mask & linux.FAN_Q_OVERFLOW:
                self.overflows += 1
                self.expire_all()
                inodes.clear()
                continue
            child = None
            for kind, fid, _name in infos:
                if kind == linux.FAN_INFO_FID:
                    child = find(fid)
            if not mask & _DIRENT:
                node = child
                if node is None:  # a directory's own event: its fid, the name "."
                    for kind, fid, name in infos:
                        if kind in _DIR_INFOS and name in _SELF:
                            node = find(fid)
                if node is not None:
                    inodes[node.node_id] = node
                    if mask & linux.FAN_DELETE_SELF and node.marked:
                        self._unmark(node, -1, remove=False)  # gone with the inode
                continue
            for kind, fid, name in infos:
                if kind not in _DIR_INFOS or name in _SELF:
                    continue
                parent = find(fid)
                if parent is not None:
                    self._name_changed(parent, name, mask, child)
                    inodes[parent.node_id] = parent
            if child is not None:
                inodes[child.node_id] = child
                if mask & linux.FAN_MOVED_FROM:
                    moved[child.node_id] = child
                elif mask & linux.FAN_MOVED_TO:  # into a watched directory: covered there
                    moved.pop(child.node_id, None)
        for node in moved.values():
            self._cover(node)
        for node in inodes.values():
            self.session.inval_inode(node.node_id)
            self.invalidations += 1

    def forget_name(self, parent_id: int, name: bytes) -> None:
        """``name`` in ``parent_id`` needs no expiring any more (it changed,
        or went through the mount: the kernel dropped it itself)."""
        with self._lock:
            names = self._names.get(parent_id)
            old = names.pop(name, None) if names else None
            if old is not None:
                self._name_count -= 1
                self._absent_count -= old == 0

    def _name_changed(self, parent, name: bytes, mask: int, child) -> None:
        session = self.session
        self.forget_name(parent.node_id, name)
        if not session.expire_only:
            return  # names have the short lifetimes here: never detach
        self.invalidations += 1
        if mask & linux.FAN_DELETE and self.table.name_gone(parent, name):
            # really gone: the kernel may drop it and what is mounted on it
            if child is not None and self.table.unlinked(child):
                session.delete(parent.node_id, child.node_id, name)
            else:
                session.inval_entry(parent.node_id, name)
            return
        session.inval_entry(parent.node_id, name, expire_only=True)

    def _listing(self, node) -> list[tuple[bytes, int]]:
        """(name, handle id or 0) of each entry of directory ``node`` now;
        none where it has no fd or cannot be read."""
        def opened(fd: int) -> int:
            try:
                return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return -1
        fd = self.table.with_fd(node, opened)
        if fd is None:  # it gave its fd back: opened by its handle
            own = self.table.reopen_fd(node)
            fd = opened(own) if own >= 0 else -1
            if own >= 0:
                os.close(own)
        if fd < 0:
            return []
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
            return [(name, handle_id(linux.name_to_handle(fd, 0, name))) for name in names]
        except OSError:
            return []
        finally:
            os.close(fd)

    def expire_all(self, why: str = "fanotify queue overflow", listing: bool = False) -> None:
        """After a queue overflow: every node's attributes and data, every
        name the daemon handed out (absent ones too) expired; nothing the
        kernel holds is dropped, so nothing mounted on the tree goes. The
        files the kernel holds by their handle ids: by the ids remembered
        with their names, and (``listing``: a new server, which has no
        record of the names a dead one handed out) in the directories it
        holds, each name there expired and each id's attributes and data;
        a running server remembers every such name, so an overflow lists
        nothing. (A name a
        dead server handed out for a file deleted or moved out of them
        while no server watched stays until its lifetime ends.)"""
        session = self.session
        nodes = self.table.nodes()
        with self._lock:
            negatives = [(p, list(names.items())) for p, names in self._names.items()]
        for node in nodes:
            session.inval_inode(node.node_id)
            if node.name and node.parent_id and session.expire_only:
                session.inval_entry(node.parent_id, node.name, expire_only=True)
            if listing and node.is_dir() and self.table.handle_ids:
                for name, node_id in self._listing(node):
                    if node_id:
                        session.inval_inode(node_id)
                    if session.expire_only:
                        session.inval_entry(node.node_id, name, expire_only=True)
        for parent_id, names in negatives:
            for name, node_id in names:
                if node_id:
                    session.inval_inode(node_id)
                if session.expire_only:
                    session.inval_entry(parent_id, name, expire_only=True)
        now = time.monotonic()
        if now - self._last_overflow_log >= _OVERFLOW_LOG_EVERY:
            self._last_overflow_log = now
            log.warning("%s: every cached name and attribute (%d nodes) expired,"
                        " nothing detached", why, len(nodes))

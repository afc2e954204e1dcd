"""The inode table: FUSE node ids <-> lower inodes.

One node per lower inode, keyed by (st_dev, st_ino), holding an O_PATH fd
of it. Every request starts from that fd, so the daemon always acts on the
inode the kernel looked up, whatever the lower names point to now. While
the fd is held the lower inode cannot be freed, so its (st_dev, st_ino)
cannot be reused by another file.

Lookup counts follow the kernel's: every reply that hands a node to the
kernel (LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK, each readdirplus entry
with attributes) adds one; FORGET and BATCH_FORGET take them back, and at
zero the node and its fd go. Node ids are never reused (a 64-bit counter),
so the generation is always 0. The lower's root is never forgotten; it is
node 1 (the FUSE root) or, when the mount shows a directory of the FUSE
filesystem (mount.py, "mount root"), node 2 below the FUSE root.

The table's fds are bounded: the kernel forgets a node when it evicts the
inode (FUSE evicts an inode as soon as no dentry or open file holds it),
and once more than ``high`` fds are held, ``shrink_wanted`` is set and
watch.Shrinker gives back the fds of nodes no running request names (each
node keeps its file handle, and get() reopens it with open_by_handle_at
when next named; a request holds every node it got until it ends). Where
handles cannot be had (no CAP_DAC_READ_SEARCH, a filesystem without them,
or a FUSE lower: its handles name an inode only while its kernel still
caches it, so once evicted they give ESTALE) the shrinker instead asks the
kernel to forget the oldest nodes (FUSE_NOTIFY_PRUNE, which drops only
names nothing uses), which sends their FORGETs. `len(table)`,
`table.peak` and `table.open_fds` say how many (bench/run.py reports them).

The watcher (watch.Watcher, ``table.watch``) is told of every node as it is
added and forgotten, so that its fanotify marks follow what the kernel
holds; it reaches node fds only under the table's lock (``with_fd``).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

from . import linux

ROOT_ID = 1  # the FUSE root: the kernel makes its inode before INIT
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Node:
    """One lower inode. ``mode`` is its file type bits (they never change
    for an inode), ``fd`` an O_PATH fd of it."""

    __slots__ = ("node_id", "fd", "key", "mode", "nlookup", "parent_id", "name", "opens", "busy",
                 "handle", "used", "stamp", "backing", "fid", "marked")

    def __init__(self, node_id: int, fd: int, key: tuple[int, int], mode: int) -> None:
        self.node_id, self.fd, self.key, self.mode = node_id, fd, key, mode
        self.nlookup = 0
        self.parent_id, self.name = 0, b""  # the last name it was looked up by
        self.opens = 0  # lower file handles open on it
        self.busy = 0  # running requests that named it: its fd stays while > 0
        self.handle: bytes | None = None  # to reopen it once its fd was given back
        self.used = 0.0  # monotonic time of the last request that named it
        self.stamp = None  # (size, mtime) at the last open: keep the page cache if unchanged
        self.backing = 0  # passthrough backing id while its opens are passed through
        self.fid: bytes | None = None  # fsid + file handle: how fanotify names it (watch.py)
        self.marked = False  # a fanotify mark of its own reports its changes (watch.py)

    @property
    def path(self) -> str:
        """A path the kernel resolves straight to this inode (the magic link
        jumps; a symlink node is not followed), for calls that take no fd."""
        return f"/proc/self/fd/{self.fd}"

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


class InodeTable:
    def __init__(self, root_fd: int, lower_type: str, root_id: int = ROOT_ID) -> None:
        """``lower_type``: the root's filesystem type as mountinfo names it."""
        st = os.fstat(root_fd)
        root = Node(root_id, root_fd, (st.st_dev, st.st_ino), stat.S_IFMT(st.st_mode))
        root.nlookup = 1 << 62  # never forgotten
        self.root = root
        self._by_id: dict[int, Node] = {root_id: root}
        self._by_key: dict[tuple[int, int], Node] = {root.key: root}
        self._lock = threading.Lock()
        self._held = threading.local()  # the nodes this thread's request has named
        self._next_id = root_id + 1
        self.peak = 1
        self.high, self.low = 1 << 62, 1 << 62  # set by the mount from RLIMIT_NOFILE
        self.shrink_wanted = threading.Event()
        self.watch = None  # watch.Watcher: told of each node added and forgotten
        self._placeholder = -1
        self.open_fds = 1
        # Idle nodes may give their fd back and be reopened by file handle
        # (needs CAP_DAC_READ_SEARCH and a filesystem with handles).
        self._mount_fd = -1
        self.handles = False
        try:
            if lower_type.startswith("fuse"):
                raise OSError(errno.ESTALE, "FUSE handles go stale once the inode is evicted")
            self._mount_fd = os.open(f"/proc/self/fd/{root_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            h = linux.name_to_handle(root_fd)
            if h is not None:
                os.close(linux.open_by_handle(self._mount_fd, h, os.O_PATH | os.O_CLOEXEC))
                self.handles = True
        except OSError:
            pass

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, node_id: int) -> Node:
        """The node, with an fd (reopened by handle if it gave it back) that
        stays open until the request ends (``request_done``)."""
        with self._lock:
            node = self._by_id.get(node_id)
            if node is None:
                raise OSError(errno.ESTALE, f"no node {node_id}")
            self._hold(node)
        if node.fd < 0:
            self._reopen(node)
        return node

    def _hold(self, node: Node) -> None:
        # under the lock: from here give_back() leaves this node's fd alone
        node.busy += 1
        node.used = time.monotonic()
        try:
            self._held.nodes.append(node)
        except AttributeError:
            self._held.nodes = [node]

    def request_done(self) -> None:
        """The running request (this thread's) names its nodes no more."""
        nodes = getattr(self._held, "nodes", None)
        if nodes:
            with self._lock:
                for node in nodes:
                    node.busy -= 1
            nodes.clear()

    def _reopen(self, node: Node) -> None:
        with self._lock:
            if node.fd >= 0:
                return
            if node.handle is None:
                raise OSError(errno.ESTALE, f"node {node.node_id} has no fd")
            fd = linux.open_by_handle(self._mount_fd, node.handle, os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != node.key:  # cannot happen; never act on another inode
                os.close(fd)
                raise OSError(errno.ESTALE, f"node {node.node_id} reopened as another inode")
            node.fd = fd
            self.open_fds += 1
        if self.open_fds > self.high:
            self.shrink_wanted.set()

    def give_back(self, count: int) -> int:
        """Close the fds of up to ``count`` nodes that no running request
        names and nothing has open, least recently named first; they are
        reopened by file handle when next named. Safe at any time: a request
        holds (``busy``) every node it got from get() or add() until it
        ends, and only nodes held by none are closed, under the same lock.
        How many were given back."""
        if not self.handles:
            return 0
        with self._lock:
            idle_nodes = sorted((n for n in self._by_id.values()
                                 if n.fd >= 0 and n.handle is not None and not n.opens
                                 and not n.busy and n is not self.root),
                                key=lambda n: n.used)[:count]
            fds = []
            for n in idle_nodes:
                fds.append(n.fd)
                n.fd = -1
            self.open_fds -= len(fds)
        for fd in fds:
            os.close(fd)
        return len(fds)

    def find(self, dev: int, ino: int) -> Node | None:
        """The node of a lower inode, if the kernel holds one (watch.py)."""
        return self._by_key.get((dev, ino))

    def nodes(self) -> list[Node]:
        with self._lock:
            return list(self._by_id.values())

    def oldest(self, count: int, after: int = 0) -> list[tuple[int, int, bytes]]:
        """(node id, parent id, name) of the ``count`` oldest named nodes
        newer than node ``after``: what the shrinker asks the kernel to drop."""
        with self._lock:
            out = []
            for node in self._by_id.values():
                if node.name and node.node_id > after:
                    out.append((node.node_id, node.parent_id, node.name))
                    if len(out) >= count:
                        break
            return out

    @staticmethod
    def open_at(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
        """An O_PATH fd of ``name`` in ``dir_fd`` (never through a symlink)
        and its stat, for add()."""
        fd = os.open(name, _O_PATH, dir_fd=dir_fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def lookup_at(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """The node of ``name`` in directory ``parent``, counted as one lookup."""
        fd, st = self.open_at(parent.fd, name)
        return self.add(fd, st, parent.node_id, name), st

    def add(self, fd: int, st: os.stat_result, parent_id: int = 0, name: bytes = b"") -> Node:
        """Count one lookup of the inode ``fd`` holds (the table takes the
        fd: kept for a new node, closed for one it already has)."""
        key = (st.st_dev, st.st_ino)
        # handles reopen through the root's mount: not for what is mounted below it
        handle = linux.name_to_handle(fd) if self.handles and key[0] == self.root.key[0] else None
        with self._lock:
            node = self._by_key.get(key)
            created = node is None
            if created:
                node = Node(self._next_id, fd, key, stat.S_IFMT(st.st_mode))
                node.handle = handle
                self._next_id += 1
                self._by_id[node.node_id] = node
                self._by_key[key] = node
                n = len(self._by_id)
                if n > self.peak:
                    self.peak = n
                self.open_fds += 1
                if self.open_fds > self.high:
                    self.shrink_wanted.set()
                fd = -1
            elif node.fd < 0:  # it had given its fd back: take this one
                node.fd, fd = fd, -1
                self.open_fds += 1
            self._hold(node)
            node.nlookup += 1
            if name:
                node.parent_id, node.name = parent_id, name
        if fd >= 0:
            os.close(fd)
        if created and self.watch is not None:  # the kernel holds it from this reply on
            self.watch.added(node, st)
        return node

    def opened(self, node: Node, passthrough=None) -> int:
        """One more lower handle open on ``node``: the passthrough backing
        id its open reply carries (0: none). The kernel wants every open of
        an inode served the same way, by one backing file, while any is
        open; so only the first open chooses, by ``passthrough()`` (an id,
        or 0), and the others follow it."""
        with self._lock:
            if not node.opens and passthrough is not None:
                node.backing = passthrough()
            node.opens += 1
            return node.backing

    def closed(self, node: Node, unregister=None) -> None:
        """One lower handle of ``node`` closed; the last may free its inode,
        and gives its backing id back by ``unregister(id)``. Not sooner: an
        open answered with the id looks it up after the reply, and its
        RELEASE (which comes after that) is what keeps the count up."""
        with self._lock:
            node.opens -= 1
            if node.opens:
                return
            backing, node.backing = node.backing, 0
        if backing and unregister is not None:
            unregister(backing)
        self.release_if_gone(node)

    def release_if_gone(self, node: Node) -> None:
        """A regular file whose last lower name is gone and that nobody has
        open: give its inode back now (the space is freed, as on a local
        filesystem), not at the FORGET that follows. The fd number stays
        taken until then, pointing at an empty memfd, so a request still
        in flight can never reach another file through a reused number."""
        with self._lock:
            if (node.opens or node.fd < 0 or not stat.S_ISREG(node.mode)
                    or node.node_id not in self._by_id):
                return
            try:
                if os.fstat(node.fd).st_nlink:
                    return
            except OSError:
                return
            if self._placeholder < 0:
                self._placeholder = os.memfd_create("shiftfs-released", os.MFD_CLOEXEC)
            os.dup2(self._placeholder, node.fd)
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]

    def forget(self, node_id: int, nlookup: int) -> bool:
        """Take back ``nlookup`` lookups; True if that released the node."""
        with self._lock:
            node = self._by_id.get(node_id)
            if node is None or node is self.root:
                return False
            node.nlookup -= nlookup
            if node.nlookup > 0:
                return False
            del self._by_id[node_id]
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            fd, node.fd = node.fd, -1
            if fd >= 0:
                self.open_fds -= 1
        if self.watch is not None:
            self.watch.forgotten(node, fd)
        if fd >= 0:
            os.close(fd)
        return True

    # ---- for the watcher, which holds no node as a request does ----
    def with_fd(self, node: Node, fn):
        """fn(fd) with ``node``'s fd, under the lock that keeps it open (None
        if it has none now: given back, or forgotten)."""
        with self._lock:
            if node.fd < 0:
                return None
            return fn(node.fd)

    def name_gone(self, parent: Node, name: bytes) -> bool:
        """Whether ``name`` is absent from ``parent`` now (False if unknown)."""
        def absent(fd: int) -> bool:
            try:
                os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return True
            except OSError:
                pass
            return False
        return bool(self.with_fd(parent, absent))

    def unlinked(self, node: Node) -> bool:
        """Whether ``node``'s lower inode has no name left (False if unknown)."""
        def gone(fd: int) -> bool:
            try:
                return os.fstat(fd).st_nlink == 0
            except OSError:
                return False
        return bool(self.with_fd(node, gone))

    def reopen_fd(self, node: Node) -> int:
        """A new O_PATH fd of a node that gave its fd back (the caller closes
        it), or -1."""
        if not self.handles or node.handle is None:
            return -1
        try:
            return linux.open_by_handle(self._mount_fd, node.handle, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return -1

    def close(self) -> None:
        """Every fd the table holds, the root's included."""
        with self._lock:
            nodes = list(self._by_id.values())
            self._by_id, self._by_key = {}, {}
        for n in nodes:
            if n.fd >= 0:
                os.close(n.fd)
        if self._mount_fd >= 0:
            os.close(self._mount_fd)
            self._mount_fd = -1

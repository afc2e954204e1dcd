"""The inode table: FUSE node ids <-> lower inodes.

One node per lower inode, found by (st_dev, st_ino), holding an O_PATH fd
of it. Every request starts from that fd, so the daemon always acts on the
inode the kernel looked up, whatever the lower names point to now.

A node names one lower inode for its whole life. While its fd is held the
inode cannot be freed, so its number cannot go to another file; but a node
that gave its fd back (below) no longer pins its inode, and once that is
freed the lower may give its number to the next new file (ext4 does, at
once). So the number only finds a candidate: a node is the inode's only if
its file handle (which carries the generation) is the inode's, or, where
no handle can be had, if it holds its fd. A node that gave its fd back is
reopened by its own handle only; when a lookup finds a node whose inode
was freed, it makes a new node, and the old one answers ESTALE (its file
is gone: the daemon held nothing that kept it). Not every handle can
do that: ext4 (ext2, f2fs) decode a generation-0 handle without checking
the generation, so it opens whatever inode has its number now (mke2fs -d
writes generation 0 into every inode of an image; a file's owner may set
it with FS_IOC_SETVERSION where metadata_csum is off): nodes with such
handles keep their fds (``_reopenable``). Handles are decoded through the
root's mount, so a node of a filesystem mounted below the root (a
restarted server has those without fds) is never reopened by its handle
either: decoded there it names the root filesystem's inode of its
number. Where a lower has no handles (some FUSE lowers, overlayfs
without nfs_export) no node gives its fd back, so none can lose its
inode. FUSE lowers report the lower daemon's inode numbers, which may
repeat while the inode we hold lives (bindfs passes the underlying
file's on); their handles (node id and generation in the lower kernel)
tell those apart too. Handles are taken only where
they are needed: by a node about to give its fd back (from that fd, which
still holds the inode), by a lookup that meets a node again under its
number (the new fd's and the node's; a new node made there keeps its own).
A node a create or a first lookup makes takes none (unless the journal
keeps it), and the watcher's question (find) takes none either: a node
without a handle holds its fd, so its number names its inode (or, on a
FUSE lower whose numbers repeat, an event for another inode under it
invalidates this node too, which is harmless).

A file (not a directory) on the root's filesystem whose handle can be
its id (node.handle_id: ext4, xfs; a generation other than 0) is known to
the kernel by that id, whichever request first named it. A readdirplus
entry of one (one link) makes no node at all (add_unopened: its handle is
taken by name, then its attributes, and the numbers must agree); a request
on the id opens the inode by the handle the id spells (``keep``); when
it ends, unless a lookup counted it, it is open, or it has a mark, the
node is parked with its fd (parking.py) until the kernel's FORGET, a
second, or 1,024 newer parked ones (then ``_let_go``). A walk of 200,000
files then keeps a node a directory, and a new server needs no record
of the files. Other files
(gen-0 images, tmpfs, btrfs) get counted ids with a node each; where the
readdirplus entry names one with the inode's number in its handle, that
node holds no fd.

Lookup counts follow the kernel's: every reply that hands a node to the
kernel (LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK, each readdirplus entry
with attributes) adds one; FORGET and BATCH_FORGET take them back, and at
zero the node and its fd go (a handle id's count, begun when its node was
kept, may end early: an open one stays until its last close). Counted ids
are never reused (a 64-bit counter below HANDLE_IDS), so the generation is
always 0. The lower's root is never forgotten; it is node 1 (the FUSE
root) or node 2 below it (mount.py, "mount root").

The table's fds are bounded: the kernel forgets a node when it evicts the
inode (FUSE evicts an inode as soon as no dentry or open file holds it),
and once more than ``high`` fds are held, ``shrink_wanted`` is set and
watch.Shrinker gives back the fds of nodes no running request names
(each takes its handle from that fd first; get() reopens it by handle
when next named; a request holds every node it got until it ends). Where
handles cannot be had (no CAP_DAC_READ_SEARCH, a filesystem without them,
or a FUSE lower: its handles name an inode only while its kernel still
caches it, so once evicted they give ESTALE) the shrinker instead asks the
kernel to forget the oldest nodes (FUSE_NOTIFY_PRUNE, which drops only
names nothing uses), which sends their FORGETs. `len(table)`,
`table.peak` and `table.open_fds` say how many (bench/run.py reports them).
The files and directories callers have open: opens.py. The watcher
(watch.Watcher, ``table.watch``) is told of every node as it is added and
forgotten, so that its marks follow what the kernel holds; it reaches
node fds only under the table's lock (``with_fd``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time

from . import linux
from .node import (HANDLE_IDS, Node, OpenFile, by_handle, handle_id, id_handle, id_of,
                   inode_key, key_of)
from .opens import _OPENING, OpenFiles
from .parking import Parked

ROOT_ID = 1  # the FUSE root: the kernel makes its inode before INIT
CLOCK_HOLDS = 256  # holds a tick of the clock that orders nodes by last use
log = logging.getLogger("shiftfs")


class InodeTable(OpenFiles):
    def __init__(self, root_fd: int, lower_type: str, root_id: int = ROOT_ID) -> None:
        """``lower_type``: the root's filesystem type as mountinfo names it."""
        st = os.fstat(root_fd)
        root = Node(root_id, root_fd, key_of(st), stat.S_IFMT(st.st_mode))
        root.nlookup = 1 << 62  # never forgotten
        root.handle = linux.name_to_handle(root_fd)
        self.root = root
        self._by_id: dict[int, Node] = {root_id: root}
        self._by_key: dict[int, Node] = {root.key: root}
        self._parked = Parked()
        self._lock = threading.Lock()
        self._held = threading.local()  # the nodes this thread's request has named
        self._next_id = root_id + 1
        # The clock that orders nodes by last use: a tick every CLOCK_HOLDS
        # holds, so the nodes named within one tick share one int object
        # (a unique one each would cost 32 bytes a node; the order the
        # shrinker needs is coarse).
        self._holds = 0
        self._clock = 0
        self.peak = 1
        self._sized_for = 1 << 12  # the most nodes since the dicts were last compacted (at least)
        self.high, self.low = 1 << 62, 1 << 62  # set by the mount from RLIMIT_NOFILE
        self.shrink_wanted = threading.Event()
        # files known by their ids that a FORGET dropped with a mark of their
        # own, for the shrinker's thread to ask about (watch.Shrinker.ask_held)
        self.dropped_marked: list[Node] = []
        self.watch = None  # watch.Watcher: told of each node added and forgotten
        self._placeholder = -1
        self.open_fds = 1
        self._init_opens()
        # what outlives this process (supervisor.py): the nodes, and the open files' fds
        self.journal = None
        self.store = None
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
        self.handle_ids = self.handles  # files' handles may be their ids (node.py)

    def __len__(self) -> int:
        return len(self._by_id)

    def peek(self, node_id: int) -> Node | None:
        """The node if the kernel holds it, without holding it for the
        request (its fd may be given back): for its ids, names and marks."""
        return self._by_id.get(node_id)

    def get(self, node_id: int) -> Node:
        """The node, with an fd (reopened by handle if it gave it back) that
        stays open until the request ends (``request_done``)."""
        with self._lock:
            node = self._by_id.get(node_id)
            if node is not None:
                if node.released:  # its fd is release_if_gone's placeholder: never served
                    raise OSError(errno.ESTALE, f"node {node_id}: its file was removed, given back")
                self._hold(node)
        if node is None:
            return self.keep(node_id, True)
        if node.fd < 0:
            self.reopen(node)
        return node

    def keep(self, node_id: int, hold: bool = False) -> Node:
        """A node for the handle id ``node_id`` (node.py), opened by the
        handle it spells: ESTALE if its inode is gone (or for any other id
        the table has no node of). It goes again once nothing uses it
        (_let_go), unless a lookup or a mark keeps it."""
        if node_id < HANDLE_IDS or not self.handle_ids:
            raise OSError(errno.ESTALE, f"no node {node_id}")
        handle = id_handle(node_id)
        fd = linux.open_by_handle(self._mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_ino != linux.handle_ino(handle) or st.st_dev != self.root.dev:
                raise OSError(errno.ESTALE, f"node {node_id} opened as another inode")
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            node = self._by_id.get(node_id)
            created = node is None
            if created:
                node = self._new(fd, key_of(st), st, handle, node_id)
                fd = -1
            elif node.fd < 0:
                node.fd, fd = fd, -1
                self.open_fds += 1
            if hold:
                self._hold(node)
        if fd >= 0:
            os.close(fd)
        elif created and self.watch is not None:
            self.watch.added(node, st)
        return node

    def _hold(self, node: Node) -> None:
        # under the lock: from here give_back() leaves this node's fd alone
        node.busy += 1
        self._holds += 1
        if not self._holds % CLOCK_HOLDS:
            self._clock += 1
        node.used = self._clock
        try:
            self._held.nodes.append(node)
        except AttributeError:
            self._held.nodes = [node]

    def request_done(self) -> None:
        """The running request (this thread's) names its nodes no more."""
        nodes = getattr(self._held, "nodes", None)
        if nodes:
            done = []
            with self._lock:
                for node in nodes:
                    node.busy -= 1
                    if node.busy:
                        continue
                    if node.forgotten:
                        done.append(self._take_fd(node))
                    elif node.nlookup <= 0 and self._droppable(node):
                        done.extend(self._park(node) if not node.nlookup else [self._let_go(node)])
            nodes.clear()
            for node, fd in done:
                self._forgotten(node, fd)

    def reopen(self, node: Node) -> None:
        """``node``'s fd again, opened by its handle where it gave it back."""
        with self._lock:
            if node.fd >= 0:
                return
            if not self._reopenable(node):
                raise OSError(errno.ESTALE, f"node {node.node_id} has no fd")
            fd = linux.open_by_handle(self._mount_fd, node.handle, os.O_PATH | os.O_CLOEXEC)
            # cannot happen, but never act on another inode: a handle of the
            # root's filesystem that holds the node's number (and a
            # generation it checks) needs no fstat to say so
            if linux.handle_ino(node.handle) != node.key >> 32 and key_of(os.fstat(fd)) != node.key:
                os.close(fd)
                raise OSError(errno.ESTALE, f"node {node.node_id} reopened as another inode")
            node.fd = fd
            self.open_fds += 1
        if self.open_fds > self.high:
            self.shrink_wanted.set()

    def _reopenable(self, node: Node) -> bool:
        """Whether ``node`` can be reopened by its handle: one that names
        its inode alone (not a generation-0 ext4 handle: that opens
        whatever has its number), of the root's filesystem (handles are
        decoded through the root's mount, where a restarted server's node
        of a filesystem mounted below it names another inode)."""
        return node.handle is not None and node.dev == self.root.dev \
            and linux.names_one_inode(node.handle)

    def give_back(self, count: int) -> int:
        """Close the fds of up to ``count`` nodes that no running request
        names and nothing has open, least recently named first; they are
        reopened by file handle when next named. Safe at any time: a request
        holds (``busy``) every node it got from get() or add() until it
        ends, and only nodes held by none are closed, under the same lock.
        How many were given back."""
        if not self.handles:
            return 0
        dev = self.root.dev  # handles reopen through the root's mount: not what is mounted below it
        with self._lock:
            idle_nodes = sorted((n for n in self._by_id.values()
                                 if n.fd >= 0 and n.dev == dev and not n.opens and not n.busy
                                 and n is not self.root and not n.released),
                                key=lambda n: n.used)[:count]
            fds, gone = [], []
            for n in idle_nodes:
                if self._droppable(n):  # its id reopens it: nothing to keep
                    gone.append(self._let_go(n))
                    continue
                if n.handle is None:  # taken now, from the fd that still holds the inode
                    h = linux.name_to_handle(n.fd)
                    if h is None:
                        continue
                    n.handle = n.fid if h == n.fid else h  # one copy where the watcher's is the same
                if not linux.names_one_inode(n.handle):  # could open another inode later: keep the fd
                    continue
                fds.append(n.fd)
                n.fd = -1
            self.open_fds -= len(fds)
        for fd in fds:
            os.close(fd)
        for node, fd in gone:
            self._forgotten(node, fd)
        return len(fds) + len(gone)

    def find(self, dev: int, ino: int, handle: bytes | None = None) -> Node | None:
        """The node of a lower inode, if the kernel holds one; with the
        inode's ``handle`` (watch.py), not a node whose inode was freed and
        its number reused."""
        node = self._by_key.get(inode_key(dev, ino))
        if node is not None and handle is not None and not self._names(node, handle):
            return None
        return node

    @staticmethod
    def _names(node: Node, handle: bytes | None) -> bool:
        """Whether ``node`` names the inode whose handle is ``handle`` (one
        found by its number): the handles agree, or where one is missing,
        the node holds its fd, and a held inode's number is not reused."""
        if node.handle is not None and handle is not None:
            return node.handle == handle
        return node.fd >= 0

    def unkept(self, dev: int, handle: bytes | None) -> Node | None:
        """The node an inode's handle is the id of (for the watcher: an
        event about a file the kernel may hold under that id), kept or for
        the moment only; None if its handle is no id here."""
        node_id = handle_id(handle) if self.handle_ids and dev == self.root.dev else 0
        if not node_id:
            return None
        node = self._by_id.get(node_id)
        if node is None:  # for this event only
            node = by_handle(node_id, inode_key(dev, linux.handle_ino(handle)), 0, handle)
        return node

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
        fd = os.open(name, linux.O_PATH_NOFOLLOW, dir_fd=dir_fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def lookup_at(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """The node of ``name`` in directory ``parent``, counted as one lookup."""
        fd, st = self.open_at(parent.fd, name)
        return self.add(fd, st, parent.node_id, name), st

    def add_unopened(self, dir_fd: int, name: bytes, parent_id: int) -> tuple[Node, os.stat_result] | None:
        """Like lookup_at, for a readdirplus entry, but with no fd: a file
        (not a directory, one link) found by its handle, taken by name
        before its attributes; None where that cannot be (no handles, a
        handle without the inode's number, a directory, a hard link, a
        name changed in between: the caller opens it). A walk then holds
        an fd a directory, not a path, and reopens a file by its handle
        when a request names it. The handle comes first: if the name
        changes before the stat, its number differs and nothing is made,
        or the number was reused and the handle (the old generation)
        answers ESTALE; never attributes of one inode for another's node.
        Where the handle is its id and the table has no node of it, the
        node returned is not kept: the id alone names the inode."""
        if not self.handles:
            return None
        handle = linux.name_to_handle(dir_fd, 0, name)
        # one parse of the handle (this runs for every readdirplus entry):
        # a FILEID_INO32_GEN one, whose generation tells inodes apart
        ino_gen = linux.ino_and_gen(handle)
        if ino_gen is None or not ino_gen[1]:
            return None
        ino, gen = ino_gen
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_ino != ino or st.st_dev != self.root.dev or st.st_nlink != 1 \
                or stat.S_ISDIR(st.st_mode):
            return None
        node_id, key = id_of(ino, gen) if self.handle_ids else 0, key_of(st)
        if node_id and key not in self._by_key and node_id not in self._by_id:
            node = by_handle(node_id, key, stat.S_IFMT(st.st_mode), handle)  # for the reply only
            node.parent_id, node.name = parent_id, name
            return node, st
        return self.add(-1, st, parent_id, name, handle), st

    def add(self, fd: int, st: os.stat_result, parent_id: int = 0, name: bytes = b"",
            handle: bytes | None = None) -> Node:
        """Count one lookup of the inode ``fd`` holds (the table takes the
        fd: kept for a new node, closed for one it already has), or of
        the inode ``handle`` names (fd -1: add_unopened). File handles are
        taken only where a node is met again by its number (to tell its
        inode from another under a reused number), when a node gives its
        fd back (give_back), and where a journal keeps the table for the
        next server."""
        key = key_of(st)
        # a node met again under this number: the new fd's handle, taken
        # before the lock (the node's own, from its fd, under it); and
        # every new node's where a journal keeps the table for the next
        # server, or where its handle may be its id
        named = self.handle_ids and st.st_dev == self.root.dev and not stat.S_ISDIR(st.st_mode)
        if handle is None and (named or self.journal is not None or key in self._by_key):
            handle = linux.name_to_handle(fd)
        node_id = handle_id(handle) if named else 0
        with self._lock:
            node = self._by_key.get(key)
            if node is not None:
                if handle is None:
                    handle = linux.name_to_handle(fd)
                if node.handle is None and node.fd >= 0:  # under the lock no one closes it
                    node.handle = linux.name_to_handle(node.fd)
                if not self._names(node, handle):
                    # its inode was freed and the number reused (or a FUSE
                    # lower shows one number for two inodes): the old node
                    # keeps its own inode (and answers ESTALE), this one is new
                    node = None
            if node is None and node_id:  # kept under its id, its number another's now
                node = self._by_id.get(node_id)
            created = node is None
            if created:
                node = self._new(fd, key, st, handle, node_id)
                fd = -1
            elif node.fd < 0 and fd >= 0:  # it had given its fd back: take this one (its own inode's)
                node.fd, fd = fd, -1
                self.open_fds += 1
            self._hold(node)
            node.nlookup += 1
            if name:
                node.parent_id, node.name = parent_id, name
            # before the reply hands the node to the kernel (a handle id needs no record)
            if self.journal is not None and (node.node_id < HANDLE_IDS or node.slot >= 0):
                if node.slot < 0:
                    self.journal.put(node)
                else:
                    self.journal.count(node)
        if fd >= 0:
            os.close(fd)
        if created and self.watch is not None:  # the kernel holds it from this reply on
            self.watch.added(node, st)
        return node

    def _new(self, fd: int, key: int, st: os.stat_result, handle: bytes | None,
             node_id: int = 0) -> Node:
        # under the lock: a node for an inode the table has none of (fd -1:
        # by its handle), under its handle id or (0) the next counted one
        if not node_id:
            node_id = self._next_id
            self._next_id += 1
            if self.journal is not None:
                self.journal.set_next_id(self._next_id)
        node = Node(node_id, fd, key, stat.S_IFMT(st.st_mode))
        node.handle = handle  # None unless it shares a number: then what tells them apart
        self._by_id[node.node_id] = node
        self._by_key[key] = node
        n = len(self._by_id)
        if n > self.peak:
            self.peak = n
        if n > self._sized_for:
            self._sized_for = n
        if fd >= 0:
            self.open_fds += 1
            if self.open_fds > self.high:
                self.shrink_wanted.set()
        return node

    def release_if_gone(self, node: Node, links: int | None = None) -> None:
        """A regular file whose last lower name is gone and that nobody has
        open: give its inode back now (the space is freed, as on a local
        filesystem), not at the FORGET that follows. The fd number stays
        taken until then, pointing at an empty memfd, so a request still
        in flight can never reach another file through a reused number.
        A node that gave its fd back holds nothing to give; if its inode
        has no name (``links``, read from the fd its last close closed: no
        link made later revives a count of 0; or its handle opens nothing
        or an inode with none), its number finds it no more."""
        with self._lock:
            if links or node.opens or not stat.S_ISREG(node.mode) or node.node_id not in self._by_id:
                return
            if node.fd < 0:  # a link made behind the mount after the UNLINK's stat keeps it
                if self._by_key.get(node.key) is node and (links == 0 or self._gone(node)):
                    del self._by_key[node.key]
                return
            try:
                if links is None and os.fstat(node.fd).st_nlink:
                    return
            except OSError:
                return
            if self._placeholder < 0:
                self._placeholder = os.memfd_create("shiftfs-released", os.MFD_CLOEXEC)
            os.dup2(self._placeholder, node.fd)
            node.released = True
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]

    def _gone(self, node: Node) -> bool:
        # under the lock: whether the inode of ``node`` (which gave its fd back) has no name left
        if not self._reopenable(node):
            return True  # nothing can reach it by number again: its number must not find it
        try:
            fd = linux.open_by_handle(self._mount_fd, node.handle, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return True
        try:
            return os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)

    def forget(self, node_id: int, nlookup: int) -> bool:
        """Take back ``nlookup`` lookups; True if that released the node."""
        with self._lock:
            node = self._by_id.get(node_id)
            if node is None or node is self.root:
                return False
            node.nlookup -= nlookup
            if node.nlookup > 0:
                if self.journal is not None and node.slot >= 0:
                    self.journal.count(node)
                return False
            if node.opens and node.node_id >= HANDLE_IDS:  # its count began after the kernel's:
                node.nlookup = min(node.nlookup, -1)  # let go (not parked) at its last close
                return False
            if self.journal is not None:
                self.journal.drop(node)
            del self._by_id[node_id]
            self._parked.discard(node_id)
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            if len(self._by_id) < self._sized_for >> 3:
                self._compact()
            if node.busy:  # a running request acts on its fd: closed when that ends
                node.forgotten = True
                return True
            node, fd = self._take_fd(node)
            # a handle id's count may have begun after the kernel's (a listing
            # hands ids out uncounted): the kernel may hold it still
            ask = node.marked and node.node_id >= HANDLE_IDS
        self._forgotten(node, fd)
        if ask:
            self.dropped_marked.append(node)
            self.shrink_wanted.set()
        return True

    def _compact(self) -> None:
        # under the lock: most nodes forgotten (a big walk's): a dict never shrinks
        # on its own (two of 200,000 entries hold 20 MB); copies fit what is left
        self._by_id, self._by_key = dict(self._by_id), dict(self._by_key)
        self._sized_for = max(len(self._by_id), 1 << 12)
        linux.malloc_trim()

    @staticmethod
    def _droppable(node: Node) -> bool:
        # a handle-id node only its fd keeps (a lookup count aside): _let_go may drop it
        return node.node_id >= HANDLE_IDS and not (node.busy or node.opens or node.marked
                                                   or node.backing)

    def _park(self, node: Node) -> list[tuple[Node, int]]:
        # under the lock: a handle-id node nothing keeps now and no FORGET came
        # for; the parked ones it pushes out go if still idle (their fds, for _forgotten)
        if not self._parked:  # the shrinker's thread sweeps them each PARK_SECONDS from now
            self.shrink_wanted.set()
        return [self._let_go(n) for n in self._parked.add(node, time.monotonic()) if self._idle(n)]

    def _idle(self, node: Node) -> bool:  # under the lock: only its fd keeps it, still ours
        return node.nlookup <= 0 and self._droppable(node) and self._by_id.get(node.node_id) is node

    def unpark_old(self) -> bool:
        """Let go the nodes parked PARK_SECONDS ago or more that nothing took
        up since (the shrinker's thread asks); whether some still are."""
        with self._lock:
            done = [self._let_go(n) for n in self._parked.expired(time.monotonic()) if self._idle(n)]
        for node, fd in done:
            self._forgotten(node, fd)
        return bool(self._parked)

    def _let_go(self, node: Node) -> tuple[Node, int]:
        # under the lock: a handle-id node kept for nothing (its id names its inode); its fd
        if self._by_id.get(node.node_id) is node:
            del self._by_id[node.node_id]
            self._parked.discard(node.node_id)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        if self.journal is not None:
            self.journal.drop(node)
        return self._take_fd(node)

    def _take_fd(self, node: Node) -> tuple[Node, int]:
        # under the lock: a forgotten node's fd, taken from it
        node.forgotten = False
        fd, node.fd = node.fd, -1
        if fd >= 0:
            self.open_fds -= 1
        return node, fd

    def _forgotten(self, node: Node, fd: int) -> None:
        if self.watch is not None:
            self.watch.forgotten(node, fd)
        if fd >= 0:
            os.close(fd)

    def restore(self, journal, held) -> None:
        """A server started after another died: every node the journal
        names (without an fd: reopened by handle when next named), and the
        open files the supervisor kept (``held``: fh -> supervisor.Held),
        at the fh numbers the kernel has."""
        with self._lock:
            for slot, node_id, nlookup, parent_id, (dev, ino), mode, backing, handle in journal.records():
                key = inode_key(dev, ino)
                node = Node(node_id, -1, key, mode)
                node.slot, node.nlookup, node.parent_id = slot, nlookup, parent_id
                node.handle, node.backing = handle, backing
                self._by_id[node_id] = node
                self._by_key.setdefault(key, node)
                if node_id < HANDLE_IDS:
                    self._next_id = max(self._next_id, node_id + 1)
            self._next_id = max(self._next_id, journal.next_id())
            for fh, h in held.items():
                directory = bool(h.flags & os.O_DIRECTORY)
                node = None if directory else self._by_id.get(h.node_id)
                if node is None and not directory and h.node_id >= HANDLE_IDS:
                    # a file the journal has no record of: its id names it
                    handle = id_handle(h.node_id)
                    node = by_handle(h.node_id, inode_key(self.root.dev, linux.handle_ino(handle)),
                                     stat.S_IFREG, handle)
                    self._by_id[h.node_id] = node
                    self._by_key.setdefault(node.key, node)
                shared = (node.node_id, h.flags & ~_OPENING) if node is not None and node.backing \
                    else None
                f = OpenFile(fh, node, h.uid, shared, h.node_id)
                f.opens = h.opens
                self._count(f)
                if shared:
                    self._shared[shared] = f
                if node is not None:
                    node.opens += h.opens
            self.journal = journal

    # ---- for the watcher, which holds no node as a request does ----
    def with_fd(self, node: Node, fn):
        """fn(fd) with ``node``'s fd, under the lock that keeps it open (None
        if it has none: given back, or forgotten)."""
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
        if not self.handles or not self._reopenable(node):
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

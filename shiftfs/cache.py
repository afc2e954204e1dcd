"""What the kernel may cache, for how long, and who invalidates it.

The table (one ``CachePolicy`` per server, built at INIT from the options,
what the lower offers -- a watcher, or none -- and what the kernel granted;
never changed afterwards; ops.py asks it, nothing writes into it):

=================  ===========================================  =========================
kind               lifetime                                     invalidated by
=================  ===========================================  =========================
attributes         long where a fanotify mark reports the       the watcher's inval_inode
(GETATTR, entry    node's changes: its own mark, or its         (watch.py); changes through
attrs, its ACLs)   directory's for a file with one link or a    this mount the kernel knows
                   directory; short otherwise                   already
names (entries)    long in a directory with a mark of its own   the watcher's inval_entry
                   where the kernel can expire a name without   with EXPIRE_ONLY (nothing
                   detaching a mount on it (FUSE_EXPIRE_ONLY,   mounted on it is detached)
                   Linux 6.2+); short otherwise
absent names       as names, and only while the watcher keeps   the watcher, after a queue
(negative entries) the name (to expire it after a queue         overflow
                   overflow); short beyond that
the FUSE root      0 (the daemon's own directory above the      --
                   lower's root, ops.ROOT_NAME)
page cache         kept across opens while the lower file's     the kernel, when it sees
                   size and mtime are unchanged (keep_cache);   them change
                   not used for passed-through files (the       (FUSE_AUTO_INVAL_DATA)
                   lower's page cache is)
symlink targets    with the page cache (FUSE_CACHE_SYMLINKS)    as the page cache
directory          kept across opens where the directory has a  the watcher's inval_inode
listings           mark (FOPEN_CACHE_DIR)                       of the directory
=================  ===========================================  =========================

"Long" and "short" come from ``-o cache=``: with a watcher (cache=auto
where fanotify works, cache=watch) long is an hour and short is the given
``*_timeout`` (1 s by default); given timeouts make long the same. Without
one (cache=timeout, or no fanotify on the lower) both are the given
timeouts; cache=forever makes both a day unless timeouts are given. A
watcher that stops (an error reading its queue) turns every long lifetime
short from then on. Where marks run out (fs.fanotify.max_user_marks) the
nodes without one get the short lifetimes.

Frozen inodes (an unmapped owner or group) are cached as any inode: they
are shown with the id (uid_t)-1, which the FUSE client holds as
INVALID_UID, so its own checks decide them as an idmapped mount does (no
owner or group class, no capability, no write; policy.py). The daemon
still decides the requests that reach it by the same rules.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from . import linux
from .node import HANDLE_IDS

WATCHED_LIFETIME = 3600.0  # what the kernel may cache when fanotify tells us of changes
FOREVER_LIFETIME = 86400.0  # -o cache=forever: the lower does not change behind the mount
MODES = ("auto", "watch", "timeout", "forever")


@dataclass(frozen=True)
class Lifetimes:
    """Seconds the kernel may trust each kind of reply."""

    attr: float = 1.0
    entry: float = 1.0
    negative: float = 1.0


@dataclass(frozen=True)
class Plan:
    """What the options ask for (``-o cache=`` and the ``*_timeout``s);
    ``policy`` settles it once the watcher and the kernel's grants are
    known."""

    mode: str = "auto"
    given: Lifetimes = Lifetimes()
    timeouts_given: bool = False

    def wants_watcher(self) -> bool:
        return self.mode in ("auto", "watch")

    def policy(self, table, watcher, expire_only: bool) -> CachePolicy:
        """The table above for a server whose table is ``table``, whose
        watcher (watch.Watcher, or None) is ``watcher``, on a kernel that
        can (``expire_only``) expire a name without detaching mounts."""
        given = self.given
        if watcher is None:
            if self.mode == "forever" and not self.timeouts_given:
                given = Lifetimes(FOREVER_LIFETIME, FOREVER_LIFETIME, FOREVER_LIFETIME)
            return CachePolicy(given, given, None, table, False)
        long = given if self.timeouts_given else Lifetimes(
            WATCHED_LIFETIME, WATCHED_LIFETIME, WATCHED_LIFETIME)
        return CachePolicy(long, given, watcher, table, expire_only)


class CachePolicy:
    """The lifetimes of the table above, asked per reply."""

    __slots__ = ("long", "short", "watcher", "table", "names_expire")

    def __init__(self, long: Lifetimes, short: Lifetimes, watcher, table,
                 names_expire: bool) -> None:
        self.long, self.short = long, short
        self.watcher = watcher
        self.table = table
        self.names_expire = names_expire

    def watching(self, node) -> bool:
        """Whether the watcher reports changes behind the mount to ``node``
        itself and, for a directory, to its names and listing (a mark of
        its own): its listing may be kept across opens."""
        w = self.watcher
        return w is not None and w.running and node.marked

    def attr(self, node, st) -> float:
        """Long where a mark reports the node's attribute and data changes:
        its own, or its directory's (which sees a change through that
        directory only, so not for a file with other links). A file known
        by its handle id, kept for a request that did not say where it is
        (no parent): the kernel holds it under a name in a directory it
        holds, and every such directory has a mark while marks last (one
        it is moved out of gives it a mark of its own: watch._cover)."""
        w = self.watcher
        if w is None:
            return self.long.attr  # nothing watched: one lifetime for all
        if w.running and node is not None and node.fid is not None:
            if node.marked:
                return self.long.attr
            if st.st_nlink == 1 or stat.S_ISDIR(st.st_mode):
                parent = self.table.peek(node.parent_id)
                if parent is not None and parent.marked and parent.dev == node.dev:
                    return self.long.attr
                if parent is None and node.node_id >= HANDLE_IDS and st.st_nlink == 1 \
                        and w.marks_every_directory(node.dev):
                    return self.long.attr
        return self.short.attr

    def names(self, parent) -> Lifetimes:
        """Long for the names in ``parent`` where its mark reports them and
        they can be expired without detaching anything."""
        w = self.watcher
        if w is None:
            return self.long
        if w.running and parent.marked and self.names_expire:
            return self.long
        return self.short

    def entry(self, node, parent) -> float:
        """The lifetime of ``node``'s name in ``parent`` (None: ROOT_NAME in
        the FUSE root, which nothing else changes)."""
        if parent is not None:
            life = self.names(parent)
            # a file known by its handle id: no node keeps its name for an overflow to expire
            if life is not self.short and node.node_id >= HANDLE_IDS and self.watcher is not None \
                    and not self.watcher.remember_name(parent, node.name, node.node_id):
                return self.short.entry
            return life.entry
        return self.long.entry if node is self.table.root else self.short.entry

    def gone(self, parent, name: bytes) -> None:
        """``name`` in ``parent`` was removed or renamed through the mount:
        a remembered name of it goes (a directory churning through
        temporary files would otherwise fill the watcher's store)."""
        if self.watcher is not None:
            self.watcher.forget_name(parent.node_id, name)

    def moved(self, st, parent, name: bytes) -> None:
        """A rename through the mount moved the kernel's name of ``st``'s
        inode to ``name`` in ``parent``, a name no reply handed out: the
        node's record follows it (what an overflow expires), or for a file
        known by its handle id alone, the name is remembered with the id
        (else a file deleted behind the mount during an overflow stays
        visible under it for the name's whole lifetime)."""
        node = self.table.find(st.st_dev, st.st_ino)
        if node is not None:
            node.parent_id, node.name = parent.node_id, name
        elif self.watcher is not None and self.names(parent) is not self.short:
            known = self.table.unkept(st.st_dev, linux.name_to_handle(parent.fd, 0, name))
            if known is not None:  # its handle is its id
                self.watcher.remember_name(parent, name, known.node_id)

    def absent(self, parent, name: bytes) -> float:
        """The lifetime of a negative entry: long only where the watcher
        keeps the name, to expire it after a queue overflow."""
        life = self.names(parent)
        if life is not self.short and self.watcher is not None \
                and not self.watcher.remember_name(parent, name):
            return self.short.negative
        return life.negative

"""One handler per FUSE request, acting on the lower fd of the node it
names and translating ids; no path strings.

Handlers take the request's context (filesystem.Context: who asks) and
plain values (node ids, bytes names, ints), and return the contract's
values (filesystem.Entry, Attr, Opened, bytes) or raise OSError; the FUSE
layer (session.py) packs and replies. Nothing here knows the wire format.
The only module that knows both the lower tree and the table.

How a request reaches the lower inode:
- every node a request names holds an O_PATH fd of its lower inode
  (inodes.py; a file known by its handle id is opened by it); GETATTR is
  one fstat of it; names are ``*at(parent_fd, name)`` never following a
  symlink; calls that take no fd use /proc/self/fd/N (the held inode).
- OPEN reopens the held inode (regular files only): a device node, FIFO or
  socket swapped in under a name the kernel has cached is never opened,
  since the daemon never opens a name for a caller;
- CREATE is O_CREAT|O_EXCL on the lower: a name that exists after all (the
  kernel's negative entry was stale) gives EEXIST for O_EXCL and ESTALE
  otherwise: the kernel looks the name up again and opens the existing
  file with its own permission check;
- new entries are made with the worker thread's fsuid/fsgid set to the
  caller's lower ids and its umask to the caller's, so the lower kernel
  gives owner, set-gid group, default ACL and mode in one step.

What the kernel caches, for how long, and who invalidates it: cache.py
(its docstring is the table; ``self.cache``, settled at INIT, answers).
Who the caller is beyond its ids (groups, capabilities, the fsid switch
for a create): caller.py. Which opens are passed through: passthrough.py.

Caveats (honest ones, as in pyfuse3's passthroughfs):
- UNLINK, RMDIR and RENAME name their victims; the kernel checked the inode
  it cached under that name. If the lower name holds another inode since,
  the daemon checks (frozen rules) and removes the one it holds now.
- POSIX locks and flock are left to the kernel (local to this mount).
- Every node holds an fd while it is in use: the daemon raises RLIMIT_NOFILE,
  and watch.Shrinker keeps the fds under 60 % of it (idle nodes give theirs
  back, reopened by file handle; else the kernel is asked to forget its
  oldest nodes). A file whose last name goes while nobody has it open
  gives its inode back at once (release_if_gone).
- Without the watcher (-o cache=timeout, a lower fanotify cannot watch)
  changes behind the mount show within the lifetimes above.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import weakref

from . import cache, caller, linux, policy, xattrs
from .caller import CAP_SYS_ADMIN, Callers, Fsids, Groups
from .describe import Describer
from .filesystem import NEGATIVE, Attr, Context, Entry, Granted, Opened, SetAttr
from .idmap import IdMap
from .inodes import ROOT_ID, InodeTable
from .node import Node
from .passthrough import Passthrough
from .setattr import AttrChanges

_ACL_ACCESS = "system.posix_acl_access"
# an unmapped id is shown as (uid_t)-1: the FUSE client makes it INVALID_UID,
# so its own checks treat the inode as an idmapped mount does (no owner, no
# capability, no write), and stat shows the overflow id
NO_ID = 0xFFFFFFFF
PARKED = 64  # listings under way kept between READDIRs without an open
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
log = logging.getLogger("shiftfs")
# what an OPEN's flags may not carry to the lower: the kernel made the name
# and checked the caller; the daemon only reopens the inode it holds. Nor
# O_APPEND, which a caller may set and clear with fcntl while the lower fd
# keeps what it was opened with: each write says whether it appends (the
# kernel's IOCB_APPEND on a passed-through file, the WRITE's flags to
# session.py), and the write-back of a mapping must go where it says.
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_TRUNC | os.O_APPEND


def _buffered(fd: int, flags: int) -> None:
    """A lower fd the daemon reads and writes from its request buffers, which
    are not aligned as O_DIRECT wants (EINVAL): without O_DIRECT. The FUSE
    side still bypasses its page cache for the caller's O_DIRECT open. A
    passed-through fd keeps it: there the kernel does the caller's I/O."""
    if flags & os.O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def _forget_proc_fd(ops_ref) -> None:
    """In a forked child: the held /proc/self/fd is the parent's fd table,
    which must never name an inode here (a new server opens its own)."""
    ops = ops_ref()
    if ops is not None and ops._proc_fd is not None:
        fd, ops._proc_fd = ops._proc_fd, None
        try:
            os.close(fd)
        except OSError:
            pass


# With ``root_below``, the FUSE root (node 1) is not the lower's root but a
# directory holding it under this one name, and the mount shows that
# directory (mount.py). The kernel makes the FUSE root's inode before INIT
# has turned POSIX ACLs on, so that inode never caches its ACL and every
# path walk through it would send GETXATTR system.posix_acl_access; the
# lower's root, looked up after INIT, caches it like any other inode.
ROOT_NAME = b"root"


class Operations:
    """The handlers of filesystem.py's table, on ``lower`` through
    ``idmap``. ``plan``: the cache options (cache.Plan), settled at INIT
    with the table's watcher (watch.Watcher tells the table of itself, or
    none) into ``self.cache``. ``root_below``: the FUSE root is a directory
    of the daemon's holding the lower's root as ROOT_NAME."""

    def __init__(self, lower: str, idmap: IdMap, plan: cache.Plan | None = None,
                 root_below: bool = False) -> None:
        root_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.lower_type = linux.fs_type(os.fstat(root_fd).st_dev)
        self.table = InodeTable(root_fd, self.lower_type, ROOT_ID + 1 if root_below else ROOT_ID)
        self.root_below = root_below
        sshfs = self.lower_type == "fuse.sshfs"
        # sftp SETSTAT follows symlinks: a symlink's chown or utimes there
        # would change whatever it points to, on the server
        self.symlink_attrs = not sshfs
        # new entries there are the sftp server user's: chown each to its creator
        self.chown_new = sshfs
        self.idmap = idmap
        self.uids = idmap.uids
        self.gids = idmap.gids
        self.plan = plan or cache.Plan()
        # until INIT settles it (no request before): the given lifetimes, nothing watched
        self.cache = cache.CachePolicy(self.plan.given, self.plan.given, None, self.table, False)
        self.callers = Callers(idmap)
        self.fsids = Fsids(self.lower_type)
        self.changes = AttrChanges(idmap, self.callers)
        self.describe = Describer(self.table, idmap)
        self.passthrough = Passthrough()
        self.daemon_uid, self.daemon_gid = self.fsids.daemon_uid, self.fsids.daemon_gid
        self._dirs: dict[int, linux.DirStream] = {}
        self._parked: dict[int, linux.DirStream] = {}  # node id -> a listing under way (list_open)
        self._uid_up, self._gid_up = self.uids.to_upper, self.gids.to_upper
        self.request_done = self.table.request_done  # the method below, one call fewer
        self._proc_fd: int | None = None  # /proc/self/fd, held from INIT on (_reopen)
        os.register_at_fork(after_in_child=functools.partial(_forget_proc_fd, weakref.ref(self)))

    # ---- lifecycle ----
    def init(self, granted: Granted, backing=None) -> None:
        """What INIT settled: the cache policy, and passthrough through
        ``backing`` (the session's backing files) where granted."""
        if self._proc_fd is None:  # after the daemon's fork: /proc/self is the serving process
            self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cache = self.plan.policy(self.table, self.table.watch, granted.expire_only)
        if backing is not None and granted.passthrough:
            self.passthrough = Passthrough(backing)

    def request_done(self) -> None:
        """The FUSE layer, as each request ends: the nodes it named may give their
        fds back."""
        self.table.request_done()

    def worker_started(self) -> None:
        """The FUSE layer, on each serving thread (Fsids)."""
        self.fsids.worker_started()

    def _reopen(self, fd: int, flags: int) -> int:
        """A new open of the inode ``fd`` holds (its magic link in
        /proc/self/fd, which the kernel resolves to the inode itself),
        looked up from the held /proc/self/fd: one path step, not four."""
        if self._proc_fd is None:
            return os.open(f"/proc/self/fd/{fd}", flags)
        return os.open(str(fd), flags, dir_fd=self._proc_fd)

    def destroy(self) -> None:
        for d in [*self._dirs.values(), *self._parked.values()]:
            os.close(d.fd)
        self._dirs.clear()
        self._parked.clear()
        self.table.close()
        if self._proc_fd is not None:
            os.close(self._proc_fd)
            self._proc_fd = None

    def lacks(self) -> list[str]:
        """What the lower cannot do that a local filesystem can, for the
        line the mount logs at start."""
        out = []
        try:
            os.listxattr(self.table.root.path)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                out.append("extended attributes (no POSIX ACLs, file capabilities or user.* names)")
        if not self.symlink_attrs:
            out.append("a symlink's own owner and times (the server's SETSTAT follows the link:"
                       " refused with EOPNOTSUPP; new symlinks stay the server user's)")
        if self.chown_new:
            out.append("new entries born with their creator's owner (each is chowned after)")
        if not self.table.handles and self.daemon_uid == 0:
            out.append("file handles that last (idle nodes keep their fds)")
        return out

    # ---- helpers ----
    def _frozen(self, st: os.stat_result) -> bool:
        return policy.is_frozen(st, self.uids, self.gids)

    def _attr(self, st: os.stat_result, node: Node | None) -> Attr:
        # a frozen inode's attributes (and ACL) are cached as any inode's:
        # no decision is made on a GETATTR (see the module docstring)
        uid, gid = self._uid_up(st.st_uid), self._gid_up(st.st_gid)
        return Attr(st, NO_ID if uid is None else uid, NO_ID if gid is None else gid,
                    self.cache.attr(node, st))

    def _entry(self, node: Node, st: os.stat_result, parent: Node | None) -> Entry:
        """The reply for ``node``'s name in ``parent`` (None: ROOT_NAME in the
        FUSE root, which nothing else changes)."""
        # _attr's work inline: this runs for every lookup and readdirplus entry
        uid, gid, cache = self._uid_up(st.st_uid), self._gid_up(st.st_gid), self.cache
        return Entry(node.node_id, st, NO_ID if uid is None else uid, NO_ID if gid is None else gid,
                     cache.attr(node, st), cache.entry(node, parent))

    def _as_caller(self, ctx: Context, parent: Node, name: bytes, mode: int, make,
                   opened: bool = False) -> tuple[int, os.stat_result]:
        """``make(mode)`` with the thread's fsuid/fsgid set to the caller's
        lower ids and its umask to the caller's; the parent must not be
        frozen. Then the new entry ``name`` is checked to be the caller's
        (_own_new). Returns an fd of it (``opened``: the fd make returned;
        otherwise an O_PATH fd of the name, taken at once) and its stat."""
        lower_uid, lower_gid = self.callers.lower_ids(ctx)
        pst = os.fstat(parent.fd)
        policy.check_dir_write(pst, self.uids, self.gids)
        # where a new entry needs a chown (which clears set-id bits), the
        # bits come after it: never a set-uid file with the wrong owner
        setid = mode & (stat.S_ISUID | stat.S_ISGID) if self.chown_new else 0
        with self.fsids.as_caller(lower_uid, lower_gid, ctx.umask):
            made = make(mode & ~setid)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else lower_gid
        fd = made if opened else os.open(name, linux.O_PATH_NOFOLLOW, dir_fd=parent.fd)
        try:
            return fd, self._own_new(fd, lower_uid, gid, setid)
        except BaseException:
            os.close(fd)
            raise

    def _own_new(self, fd: int, uid: int, gid: int, setid: int) -> os.stat_result:
        """A lower that ignores the creator's fsuid (sshfs: the sftp
        server's user owns what it makes) gets the new entry ``fd`` holds
        chowned to the caller and its set-id bits put back. Only the uid
        tells: a lower's own group rules (grpid, set-gid directories) are
        kept. Its stat, after that."""
        st = os.fstat(fd)
        if st.st_uid == uid and not setid:
            return st
        if stat.S_ISLNK(st.st_mode) and not self.symlink_attrs:
            return st  # its chown would reach the target: it stays the server's
        if not self.chown_new:
            log.warning("the lower (%s) does not give new entries their creator's owner: "
                        "each is chowned after it is made", self.lower_type)
            self.chown_new = True
        if st.st_uid != uid:
            linux.chown_fd(fd, uid, gid if st.st_gid != gid else -1)
        mode = stat.S_IMODE(st.st_mode) | setid
        if mode != stat.S_IMODE(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", mode)
        return os.fstat(fd)

    def _new_entry(self, parent: Node, name: bytes, made: tuple[int, os.stat_result]) -> Entry:
        """The entry just made under ``name`` (_as_caller's fd and stat), one lookup."""
        fd, st = made
        return self._entry(self.table.add(fd, st, parent.node_id, name), st, parent)

    def _frozen_access(self, ctx: Context, node: Node, st: os.stat_result, want: int) -> None:
        """EACCES unless the caller may ``want`` this frozen inode as an
        idmapped mount decides (mode bits, mapped group, ACL; no capability)."""
        acl = None
        if st.st_mode & 0o070 and not stat.S_ISLNK(st.st_mode):
            try:
                acl = os.getxattr(node.path, _ACL_ACCESS)
            except OSError:
                pass
        groups = Groups(ctx)  # read from /proc only where a decision needs them
        if not policy.frozen_permitted(st, self.uids, self.gids, ctx.uid, groups, want, acl):
            raise OSError(errno.EACCES, "inode has an unmapped owner")

    @staticmethod
    def _name(name: bytes) -> bytes:
        if name in (b".", b"..") or b"/" in name:
            raise OSError(errno.EINVAL, "not a name")
        return name

    # ---- names ----
    def lookup(self, ctx: Context, parent_id: int, name: bytes) -> Entry:
        if parent_id == ROOT_ID and self.root_below:  # only the mount's own setup asks
            if name != ROOT_NAME:
                return NEGATIVE
            root = self.table.root
            return self._entry(root, os.fstat(root.fd), None)
        parent = self.table.get(parent_id)
        pst = os.fstat(parent.fd)
        if self._frozen(pst):  # a lookup searches the directory: decided as the kernel would
            self._frozen_access(ctx, parent, pst, policy.MAY_EXEC)
        try:
            node, st = self.table.lookup_at(parent, self._name(name))
        except FileNotFoundError:
            return Entry(0, None, 0, 0, 0.0, self.cache.absent(parent, name))
        return self._entry(node, st, parent)

    def forget(self, pairs) -> None:
        for node_id, nlookup in pairs:
            self.table.forget(node_id, nlookup)

    def made_by(self, ctx: Context, parent_id: int, name: bytes) -> Entry | None:
        """For a resent request that makes ``name`` and now finds it: its
        entry (one lookup) if it is the caller's, whose first try made it
        before its server died; else None (someone else's: EEXIST stands)."""
        entry = self.lookup(ctx, parent_id, name)
        if not entry.node_id:
            return None
        if entry.uid == ctx.uid:
            return entry
        self.table.forget(entry.node_id, 1)
        return None

    def resume_dir(self, fh: int) -> None:
        """An open directory a dead server held (the supervisor kept it):
        its stream, from the offsets the kernel sends."""
        self._dirs[fh] = linux.DirStream(fh)

    def mknod(self, ctx, parent_id, name, mode, rdev) -> Entry:
        parent = self.table.get(parent_id)
        return self._new_entry(parent, name, self._as_caller(
            ctx, parent, self._name(name), mode, lambda m: os.mknod(name, m, rdev, dir_fd=parent.fd)))

    def mkdir(self, ctx, parent_id, name, mode) -> Entry:
        parent = self.table.get(parent_id)
        return self._new_entry(parent, name, self._as_caller(
            ctx, parent, self._name(name), mode, lambda m: os.mkdir(name, m, dir_fd=parent.fd)))

    def symlink(self, ctx, target, parent_id, name) -> Entry:
        parent = self.table.get(parent_id)
        return self._new_entry(parent, name, self._as_caller(
            ctx, parent, self._name(name), 0, lambda _m: os.symlink(target, name, dir_fd=parent.fd)))

    def link(self, ctx, node_id, parent_id, name) -> Entry:
        node = self.table.get(node_id)
        parent = self.table.get(parent_id)
        st = os.fstat(node.fd)
        policy.check_link(st, self.callers.mapped(ctx), os.fstat(parent.fd), self.uids, self.gids)
        # the held inode itself, not whatever a name points to now
        os.link(node.path, self._name(name), dst_dir_fd=parent.fd, follow_symlinks=True)
        fd = os.dup(node.fd)
        st = os.fstat(fd)
        return self._entry(self.table.add(fd, st, parent_id, name), st, parent)

    def _delete(self, parent_id: int, name: bytes, remove) -> None:
        parent = self.table.get(parent_id)
        name = self._name(name)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        policy.check_delete(st, os.fstat(parent.fd), self.uids, self.gids)
        remove(name, dir_fd=parent.fd)
        self.cache.gone(parent, name)
        self._released(st)

    def _released(self, st: os.stat_result | None) -> None:
        """After a name went: free a file nobody holds at once."""
        if st is not None and st.st_nlink <= 1 and stat.S_ISREG(st.st_mode):
            node = self.table.find(st.st_dev, st.st_ino)
            if node is not None:
                self.table.release_if_gone(node)

    def unlink(self, ctx, parent_id, name) -> None:
        self._delete(parent_id, name, os.unlink)

    def rmdir(self, ctx, parent_id, name) -> None:
        self._delete(parent_id, name, os.rmdir)

    def rename(self, ctx, parent_id, name, newparent_id, newname, flags) -> None:
        old_dir = self.table.get(parent_id)
        new_dir = self.table.get(newparent_id)
        name, newname = self._name(name), self._name(newname)
        old_st = os.stat(name, dir_fd=old_dir.fd, follow_symlinks=False)
        try:
            new_st = os.stat(newname, dir_fd=new_dir.fd, follow_symlinks=False)
        except FileNotFoundError:
            new_st = None
        if new_st is not None and flags & linux.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "rename: target exists")
        policy.check_rename(old_st, os.fstat(old_dir.fd), new_st, os.fstat(new_dir.fd),
                            new_st is not None or self.callers.mapped(ctx), self.uids, self.gids)
        if flags:
            if flags & linux.RENAME_WHITEOUT:  # the whiteout is the daemon's, as before
                self.fsids.restore(always=True)
            linux.renameat2(old_dir.fd, name, new_dir.fd, newname, flags)
        else:
            os.rename(name, newname, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)
        self.cache.gone(old_dir, name)
        self.cache.moved(old_st, new_dir, newname)
        if not flags & linux.RENAME_EXCHANGE:
            self._released(new_st)
        elif new_st is not None:  # None: it appeared after the stat
            self.cache.moved(new_st, old_dir, name)

    # ---- attributes ----
    def getattr(self, ctx: Context, node_id: int, fh: int | None) -> Attr:
        if node_id == ROOT_ID and self.root_below:  # the daemon's own, never cached
            return Attr(os.fstat(self.table.root.fd), self.daemon_uid, self.daemon_gid, 0.0)
        if fh is not None:  # the open file's node, without reopening its fd
            return self._attr(os.fstat(fh), self.table.peek(node_id))
        node = self.table.get(node_id)
        return self._attr(os.fstat(node.fd), node)

    def readlink(self, ctx: Context, node_id: int) -> bytes:
        return os.readlink(b"", dir_fd=self.table.get(node_id).fd)

    def statfs(self, ctx: Context, node_id: int):
        return os.fstatvfs(self.table.root.fd)

    def setattr(self, ctx: Context, node_id: int, attr: SetAttr, fh: int | None) -> Attr:
        node = self.table.get(node_id)
        if stat.S_ISLNK(node.mode) and not self.symlink_attrs:
            raise OSError(errno.EOPNOTSUPP, "the lower's setattr of a symlink reaches its target")
        self.changes.apply(ctx, node, attr, fh)
        return self._attr(os.fstat(node.fd), node)

    def write_kills_suidgid(self, ctx: Context, node_id: int, fh: int) -> bool:
        """FUSE_WRITE_KILL_SUIDGID: the kernel asks, for a write by a caller
        without CAP_FSETID (any file), what file_remove_privs would clear."""
        self.changes.kill_suidgid(ctx, self.table.get(node_id), fh, os.fstat(fh))
        return True

    # ---- files ----
    def open(self, ctx: Context, node_id: int, flags: int) -> Opened:
        """A new lower fd of the held inode."""
        node = self.table.get(node_id)
        if not node.is_reg():  # the kernel opens devices and FIFOs itself
            raise OSError(errno.EACCES, "not a regular file")
        uid = ctx.uid
        self.table.admit(uid)
        fd = self._reopen(node.fd, (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if self._frozen(st):
                if flags & (os.O_WRONLY | os.O_RDWR):
                    policy.check_modify(st, self.uids, self.gids, "write")
                else:  # read or exec of a frozen file
                    self._frozen_access(ctx, node, st, policy.open_want(flags))
        except BaseException:
            os.close(fd)
            raise
        fh, backing = self._serve(node, fd, st, flags, uid)
        stamp = None if backing else (st.st_size, st.st_mtime_ns)  # passthrough skips this cache
        keep = stamp is not None and node.stamp == stamp
        node.stamp = stamp
        return Opened(fh, keep, backing, _whole_appends(flags, backing))

    def _serve(self, node: Node, fd: int, st: os.stat_result, flags: int, uid: int,
               fresh: bool = False):
        """A new open of ``node`` by ``uid`` on the lower ``fd`` (the table
        takes it): (fh, passthrough backing id), the fh an fd the daemon
        can read and write where the id is 0. ``fresh``: a file this
        request made (it has no security.capability)."""
        fh, backing = self.table.opened(node, fd, flags, uid, self.passthrough.chooser(
            fd, st, fresh))
        if not backing:
            _buffered(fh, flags)
        return fh, backing

    def create(self, ctx: Context, parent_id: int, name: bytes, mode: int,
               flags: int) -> tuple[Entry, Opened]:
        """A new file, opened; never opens one that exists."""
        parent = self.table.get(parent_id)
        name = self._name(name)
        uid = ctx.uid
        self.table.admit(uid)  # before the file exists: a refused create makes none
        try:
            fd, st = self._as_caller(ctx, parent, name, mode, lambda m: os.open(
                name, (flags & ~(os.O_NOCTTY | os.O_APPEND)) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                | os.O_CLOEXEC,
                m, dir_fd=parent.fd), opened=True)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            raise OSError(errno.ESTALE, "the name exists: look it up again") from None
        try:
            node = self.table.add(self._reopen(fd, os.O_PATH | os.O_CLOEXEC), st,
                                  parent_id, name)
        except BaseException:
            os.close(fd)
            raise
        fh, backing = self._serve(node, fd, st, flags, uid, fresh=True)
        node.stamp = None if backing else (st.st_size, st.st_mtime_ns)
        return self._entry(node, st, parent), Opened(fh, False, backing, _whole_appends(flags, backing))

    def tmpfile(self, ctx: Context, parent_id: int, mode: int, flags: int) -> tuple[Entry, Opened]:
        """O_TMPFILE: an unnamed file in ``parent``, born the caller's (as a
        create), which linkat can give a name through the mount."""
        parent = self.table.get(parent_id)
        lower_uid, lower_gid = self.callers.lower_ids(ctx)
        pst = os.fstat(parent.fd)
        policy.check_dir_write(pst, self.uids, self.gids)
        self.table.admit(ctx.uid)  # before the file exists: a refused one makes none
        dir_fd = os.open(parent.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with self.fsids.as_caller(lower_uid, lower_gid, ctx.umask):
                fd = os.open(".", (flags & ~(os.O_NOCTTY | os.O_CREAT | os.O_EXCL | os.O_APPEND))
                             | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            node = self.table.add(self._reopen(fd, os.O_PATH | os.O_CLOEXEC), st,
                                  parent_id, b"")
        except BaseException:
            os.close(fd)
            raise
        fh, backing = self._serve(node, fd, st, flags, ctx.uid, fresh=True)
        node.stamp = None if backing else (st.st_size, st.st_mtime_ns)
        return self._entry(node, st, parent), Opened(fh, False, backing, _whole_appends(flags, backing))

    def handed_out(self, node_id: int, fh: int, directory: bool = False) -> bool:
        """Whether ``fh`` is an open file (directory) of ``node_id``."""
        if directory:
            return fh in self._dirs and self.table.handed_out(fh, node_id, True)
        return self.table.handed_out(fh, node_id, False)

    def release(self, node_id: int, fh: int) -> None:
        if self.table.handed_out(fh, node_id, True):
            log.warning("RELEASE of fh %d, a directory's", fh)
            return
        self.table.closed(fh, self.passthrough.close, node_id)

    def fsync(self, fh: int, datasync: int) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        linux.fallocate(fh, mode, offset, length)

    def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags) -> int:
        return os.copy_file_range(fh_in, fh_out, length, off_in, off_out)

    # ---- directories ----
    def opendir(self, ctx: Context, node_id: int) -> Opened:
        """An open lower directory; ``keep_cache``: the kernel may keep
        its listing across opens."""
        node = self.table.get(node_id)
        uid = ctx.uid
        if node.is_dir():
            self.table.admit(uid)
        fd = self._open_dir(ctx, node)
        self.table.dir_opened(fd, uid, node_id)
        self._dirs[fd] = linux.DirStream(fd)
        # the kernel may keep the listing while the watcher invalidates the
        # directory on every change behind the mount
        return Opened(fd, self.cache.watching(node))

    def list_open(self, ctx: Context, node_id: int) -> int:
        """A READDIR, FSYNCDIR or directory ioctl without an open (the
        kernel's no-opendir mode): an fd of the directory for this request,
        for ``list_close``. A listing goes on in the stream the last request
        on the node parked: an offset is only sure to mean something to the
        open that gave it (sshfs fails a fresh open's seek). The kernel
        checked the caller's open; a frozen directory is checked again."""
        node = self.table.get(node_id)
        stream = self._parked.pop(node_id, None)
        fd = self._open_dir(ctx, node, stream.fd if stream is not None else None)
        self._dirs[fd] = stream or linux.DirStream(fd)
        return fd

    def _open_dir(self, ctx: Context, node: Node, fd: int | None = None) -> int:
        """``node``'s directory opened for reading (or ``fd``, an open of it
        already), a frozen one decided as the kernel would; closed again
        where refused."""
        if not node.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        if fd is None:
            fd = self._reopen(node.fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if self._frozen(st):
                self._frozen_access(ctx, node, st, policy.MAY_READ)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def list_close(self, node_id: int, fd: int, ended: bool = True) -> None:
        """The request is done with ``list_open``'s fd: closed if the
        listing ``ended`` (or failed), else parked for the next READDIR of
        the node (at most PARKED listings; the oldest goes)."""
        stream = self._dirs.pop(fd, None)
        if ended or stream is None:
            os.close(fd)
            return
        old = self._parked.pop(node_id, None)
        self._parked[node_id] = stream
        if old is not None:
            os.close(old.fd)
        while len(self._parked) > PARKED:
            try:
                os.close(self._parked.pop(next(iter(self._parked))).fd)
            except (KeyError, RuntimeError, StopIteration):  # another thread took it
                break

    def readdir(self, node_id: int, fh: int, off: int) -> linux.DirStream:
        stream = self._dirs[fh]
        stream.seek(off)
        return stream

    def readdir_entry(self, ctx: Context, parent_id: int, fh: int, name: bytes,
                      d_type: int) -> Entry | None:
        """A readdirplus entry with attributes (one lookup), or None: the
        dot entries and a vanished name."""
        if name in (b".", b".."):
            return None
        try:
            found = None if d_type == _DT_DIR else self.table.add_unopened(fh, name, parent_id)
            if found is None:
                fd, st = self.table.open_at(fh, name)
                found = self.table.add(fd, st, parent_id, name), st
        except OSError:
            return None
        return self._entry(found[0], found[1], self.table.peek(parent_id))

    def releasedir(self, node_id: int, fh: int) -> None:
        if not self.handed_out(node_id, fh, True):
            log.warning("RELEASEDIR of fh %d, which no open directory of node %d holds", fh, node_id)
            return
        self._dirs.pop(fh, None)
        self.table.closed(fh, None, node_id)

    # ---- extended attributes ----
    def getxattr(self, ctx: Context, node_id: int, name: bytes) -> bytes:
        if node_id == ROOT_ID and self.root_below:
            raise OSError(errno.ENODATA, "the FUSE root has no xattrs")
        node = self.table.get(node_id)
        if policy.xattr_read_needs_permission(name):
            st = os.fstat(node.fd)
            if self._frozen(st):
                self._frozen_access(ctx, node, st, policy.MAY_READ)
        value = os.getxattr(node.path, name)
        return xattrs.to_upper(name, value, self.idmap)

    def listxattr(self, ctx: Context, node_id: int) -> bytes:
        names = os.listxattr(self.table.get(node_id).path)
        if any(n.startswith("trusted.") for n in names) and not caller.has_cap(ctx, CAP_SYS_ADMIN):
            # a local filesystem lists trusted.* only to CAP_SYS_ADMIN callers;
            # the daemon (root) sees them all, so filter as the kernel would
            names = [n for n in names if not n.startswith("trusted.")]
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def setxattr(self, ctx: Context, node_id: int, name: bytes, value: bytes, flags: int) -> None:
        node = self.table.get(node_id)
        policy.check_modify(os.fstat(node.fd), self.uids, self.gids, "setxattr")
        lower_value = xattrs.to_lower(name, value, self.idmap)
        if name in _ACL_NAMES:  # keep the entries the mount does not show
            try:
                stored = os.getxattr(node.path, name)
            except OSError:
                stored = None
            lower_value = xattrs.acl_keep_unmapped(lower_value, stored, self.idmap)
        os.setxattr(node.path, name, lower_value, flags)

    def removexattr(self, ctx: Context, node_id: int, name: bytes) -> None:
        node = self.table.get(node_id)
        policy.check_modify(os.fstat(node.fd), self.uids, self.gids, "setxattr")
        os.removexattr(node.path, name)

    # ---- ioctls ----
    def ioctl(self, ctx: Context, node_id: int, fh: int, cmd: int, arg: bytes,
              out_size: int) -> tuple[int, bytes]:
        """The ioctls that only read the lower file's own state (its
        attribute flags), answered from the open lower fd; the rest are
        refused with ENOTTY, and setting flags (chattr) with EPERM, as the
        kernel refuses it to a container's root (CAP_LINUX_IMMUTABLE)."""
        if cmd in _IOCTL_READ:
            buf = bytearray(max(out_size, _IOCTL_READ[cmd]))
            result = fcntl.ioctl(fh, cmd, buf, True)
            return result, bytes(buf[:out_size])
        if cmd in _IOCTL_SET:
            raise OSError(errno.EPERM, "setting inode flags through the mount")
        raise OSError(errno.ENOTTY, "ioctl not passed to the lower")


_DT_DIR = 4  # a dirent's d_type for a directory
# FS_IOC_GETFLAGS, FS_IOC_GETVERSION, FS_IOC_FSGETXATTR (and their sizes);
# FS_IOC_SETFLAGS, FS_IOC_SETVERSION, FS_IOC_FSSETXATTR
_IOCTL_READ = {0x80086601: 8, 0x80087601: 8, 0x801C581F: 28}
_IOCTL_SET = {0x40086602, 0x40087602, 0x401C5820}


def _whole_appends(flags: int, backing: int) -> bool:
    """An O_APPEND open the daemon serves bypasses the FUSE page cache
    (FOPEN_DIRECT_IO): the kernel then sends each write() whole, as one
    WRITE the lower appends at once, where through the page cache it splits
    a write at a page it does not hold into two, and another writer of the
    same lower could append between them. A passed-through open appends in
    the lower itself."""
    return bool(flags & os.O_APPEND) and not backing

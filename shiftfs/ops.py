"""One handler per FUSE request, acting on the lower fd of the node it
names and translating ids; no path strings.

Handlers take the request's context (filesystem.Context: who asks) and
plain values (node ids, bytes names, ints), and return the contract's
values (filesystem.Entry, Attr, Opened, bytes) or raise OSError; the FUSE
layer (session.py) packs and replies. Nothing here knows the wire format. The only module that knows both the lower tree and the
table.

How a request reaches the lower inode:
- every node holds an O_PATH fd of its lower inode (inodes.py); GETATTR is
  one fstat of it; names are ``*at(parent_fd, name)`` never following a
  symlink; calls that take no fd use /proc/self/fd/N, which the kernel
  resolves to the held inode itself (a symlink node is not followed);
- OPEN reopens the held inode (regular files only): a device node, FIFO or
  socket swapped in under a name the kernel has cached is never opened,
  since the daemon never opens a name for a caller;
- CREATE is O_CREAT|O_EXCL on the lower: a name that exists after all (the
  kernel's negative entry was stale) gives EEXIST for O_EXCL and ESTALE
  otherwise, which makes the kernel look the name up again and open the
  existing file with its own permission check;
- new entries are made with the worker thread's fsuid/fsgid set to the
  caller's lower ids and its umask to the caller's, so the lower kernel
  gives owner, set-gid group, default ACL and mode in one step.

What the kernel caches, for how long, and who invalidates it
(``Lifetimes``):
- entry (name -> node) and attr replies: ``entry_timeout`` and
  ``attr_timeout`` (1 s by default; an hour where watch.Watcher reports the
  changes: names in a directory with a fanotify mark of its own, attributes
  of a node with one or in such a directory); changes made through this
  mount are known to the kernel already, changes behind it are invalidated
  by the watcher or show within the timeout (``unwatched``, the short ones,
  where marks ran out or the filesystem cannot be watched; names also on a
  kernel without FUSE_EXPIRE_ONLY, where invalidating one could detach a
  mount on it);
- negative entries (no such name): ``negative_timeout``, under the same
  rule; the watcher keeps the long-lived ones, to expire them after a
  queue overflow;
- names inside a frozen directory (an unmapped lower owner or group) get
  entry lifetime 0, so every lookup there, a search of that directory,
  reaches the daemon; the other accesses it decides on frozen inodes
  (OPEN, OPENDIR, GETXATTR of user.* names) always reach it. Their
  attributes (and with them their ACLs) are cached as any inode's: no
  decision is made on a GETATTR, and a lifetime 0 only made the kernel
  ask the attributes and the ACL again before each of its own checks;
- page cache: kept across opens while the lower file's size and mtime are
  unchanged (keep_cache), dropped by the kernel when it sees them change
  (FUSE_CAP_AUTO_INVAL_DATA);
- symlink targets: cached with the page cache (FUSE_CAP_CACHE_SYMLINKS);
- file data with FUSE passthrough (libfuse 3.17, Linux 6.9+, a daemon with
  CAP_SYS_ADMIN): the opens of a regular file go to the lower file in the
  kernel, no READ or WRITE reaches the daemon and the FUSE page cache is not
  used (the lower's is); not for frozen files, files with a set-uid bit, a
  set-gid bit with group exec or a security.capability (the daemon decides
  about those itself), nor lowers stacked on another stacking filesystem
  (overlayfs, a second shiftfs: the kernel refuses them as backing files);
- directory listings: kept across opens while the directory has a mark
  (FOPEN_CACHE_DIR, dropped by the watcher's inval_inode of the directory;
  rootless too), never for frozen directories;
- POSIX ACLs: cached by the kernel with the inode, dropped when its
  attributes change through this mount; the mount root's too, since a root
  daemon mounts the lower's root below the FUSE root (``ROOT_NAME``).

Caveats (honest ones, as in pyfuse3's passthroughfs):
- UNLINK, RMDIR and RENAME name their victims; the kernel checked the
  inode it had cached under that name. If the lower name was swapped for
  another inode since, the daemon checks (frozen rules) and removes the one
  the name points to now.
- POSIX locks and flock are left to the kernel (local to this mount).
- Every node holds an fd while it is in use: the daemon raises
  RLIMIT_NOFILE at start, and watch.Shrinker keeps the fds under 60 % of it
  (nodes no running request names give theirs back and are reopened by
  file handle; failing that, the kernel is asked to forget its oldest
  nodes). A file whose last name goes while nobody has it open gives its
  inode back at once (inodes.release_if_gone).
- Without the watcher (-o cache=timeout, a lower fanotify cannot watch)
  changes behind the mount show within the lifetimes above.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import functools
import threading
import weakref
from dataclasses import dataclass

from . import linux, policy, xattrs
from .filesystem import (NEGATIVE, SET_ATTR_ATIME, SET_ATTR_ATIME_NOW, SET_ATTR_GID,
                         SET_ATTR_KILL_SUIDGID, SET_ATTR_MODE, SET_ATTR_MTIME,
                         SET_ATTR_MTIME_NOW, SET_ATTR_SIZE, SET_ATTR_UID, Attr, Context, Entry,
                         Granted, Opened, SetAttr)
from .idmap import IdMap
from .inodes import ROOT_ID, InodeTable, Node

CAP_FOWNER = 3
CAP_FSETID = 4
_CAP_SYS_ADMIN = 21
UNCHANGED = 0xFFFFFFFF  # (uid_t)-1 in chown: keep this id
_ACL_ACCESS = "system.posix_acl_access"
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
log = logging.getLogger("shiftfs")
# what an OPEN's flags may not carry to the lower: the kernel made the name
# and checked the caller; the daemon only reopens the inode it holds. Nor
# O_APPEND, which a caller may set and clear with fcntl while the lower fd
# keeps what it was opened with: each write says whether it appends (the
# kernel's IOCB_APPEND on a passed-through file, the WRITE's flags to
# session.py), and the write-back of a mapping must go where it says.
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_TRUNC | os.O_APPEND
_DIRBUF = 32768
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# lowers whose calls are decided by the calling thread's capabilities alone
# (not by a server or daemon that sees its fsuid): a create may leave the
# caller's fsuid on a serving thread there (Operations._keep_ids)
_LOCAL_TYPES = frozenset(("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "bcachefs",
                          "jfs", "reiserfs", "nilfs2", "zfs"))


def _buffered(fd: int, flags: int) -> None:
    """A lower fd the daemon reads and writes from libfuse's buffers, which
    are not aligned as O_DIRECT wants (EINVAL): without O_DIRECT. The FUSE
    side still bypasses its page cache for the caller's O_DIRECT open. A
    passed-through fd keeps it: there the kernel does the caller's I/O."""
    if flags & os.O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


@dataclass
class Lifetimes:
    """Seconds the kernel may trust each kind of reply."""

    attr: float = 1.0
    entry: float = 1.0
    negative: float = 1.0


def _caller_cap_eff(pid: int) -> int:
    """The caller's effective capability mask (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return policy.parse_cap_eff(f.read())
    except OSError:
        return 0


def _in_daemon_userns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def _caller_has_cap(ctx: Context, cap: int) -> bool:
    """Whether the caller holds ``cap`` in the daemon's user namespace (the
    kernel's capable(): CAP_SYS_ADMIN for seeing trusted.* names,
    CAP_FSETID for keeping set-id bits on a write). Unknown means no."""
    pid = ctx.pid
    return _in_daemon_userns(pid) and bool(_caller_cap_eff(pid) >> cap & 1)


_CHOWN_SYSCALLS = {"x86_64": {92, 93, 94, 260}, "aarch64": {54, 55}}.get(os.uname().machine, set())


def _caller_in_chown(ctx: Context) -> bool:
    """Whether the caller is inside a chown-family syscall: an empty
    SETATTR is either chown(-1, -1) or a write's set-gid clearing, and the
    kernel treats the two differently. Unknown means no."""
    try:
        with open(f"/proc/{ctx.pid}/syscall", "rb") as f:
            return int(f.read().split(None, 1)[0]) in _CHOWN_SYSCALLS
    except (OSError, ValueError, IndexError):
        return False


class _CallerGroups:
    """The caller's groups (fsgid and supplementary, upper ids) as
    policy.frozen_permitted asks for them: ``gid in groups``. The
    supplementary ones are read from /proc only when a question needs them
    (a frozen inode whose group class or ACL group entries decide)."""

    __slots__ = ("ctx", "_more")

    def __init__(self, ctx: Context) -> None:
        self.ctx, self._more = ctx, None

    def __contains__(self, gid) -> bool:
        if gid == self.ctx.gid:
            return True
        if self._more is None:
            self._more = frozenset(self.ctx.groups())
        return gid in self._more


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


class DirStream:
    """An open lower directory, read in getdents batches and resumed at the
    offsets the lower gives: memory per handle is one batch, whatever the
    directory's size."""

    __slots__ = ("fd", "frozen", "pos", "batch", "index", "buf")

    def __init__(self, fd: int, frozen: bool) -> None:
        self.fd, self.frozen = fd, frozen
        self.pos = 0
        self.batch: list = []
        self.index = 0
        self.buf = None

    def seek(self, off: int) -> None:
        if off != self.pos:
            os.lseek(self.fd, off, os.SEEK_SET)
            self.pos, self.batch, self.index = off, [], 0

    def peek(self):
        if self.index >= len(self.batch):
            if self.buf is None:
                import ctypes
                self.buf = ctypes.create_string_buffer(_DIRBUF)
            self.batch, self.index = linux.getdents(self.fd, self.buf), 0
            if not self.batch:
                return None
        return self.batch[self.index]

    def advance(self) -> None:
        self.pos = self.batch[self.index][3]
        self.index += 1


# With ``root_below``, the FUSE root (node 1) is not the lower's root but a
# directory holding it under this one name, and the mount shows that
# directory (mount.py). The kernel makes the FUSE root's inode before INIT
# has turned POSIX ACLs on, so that inode never caches its ACL and every
# path walk through it would send GETXATTR system.posix_acl_access; the
# lower's root, looked up after INIT, caches it like any other inode.
ROOT_NAME = b"root"


class Operations:
    def __init__(self, lower: str, idmap: IdMap, lifetimes: Lifetimes | None = None,
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
        self.life = lifetimes or Lifetimes()
        self.unwatched = self.life  # lifetimes where no watcher sees changes
        self.watcher = None  # watch.Watcher, where changes behind the mount are watched
        self.daemon_uid = os.geteuid()
        self.daemon_gid = os.getegid()
        self._dirs: dict[int, DirStream] = {}
        self._ovf_uid, self._ovf_gid = idmap.overflow_uid, idmap.overflow_gid
        self._uid_up, self._gid_up = self.uids.to_upper, self.gids.to_upper
        self.request_done = self.table.request_done  # the method below, one call fewer
        self.backing_files = None  # the session, once INIT granted passthrough
        self._offered_backing = None
        # Each serving thread's fsuid, fsgid and umask (worker_started): a
        # create sets them only where they differ, and leaves them the
        # caller's where nothing else reads them: the thread keeps its
        # capabilities whatever its fsuid (SECBIT_NO_SETUID_FIXUP, set
        # before the threads start), and the lower is a local filesystem,
        # which decides by those capabilities (an NFS server, or a FUSE
        # lower's daemon, would see the caller's ids on every later call).
        # Otherwise the daemon's ids come back after each create.
        self._thread = threading.local()
        self._keep_ids = (self.daemon_uid == 0 and self.lower_type in _LOCAL_TYPES
                          and linux.caps_kept_across_fsuid())
        self._proc_fd: int | None = None  # /proc/self/fd, held from INIT on (_reopen)
        os.register_at_fork(after_in_child=functools.partial(_forget_proc_fd, weakref.ref(self)))

    # ---- lifecycle ----
    def offer_passthrough(self, session) -> None:
        """Use ``session``'s backing files if INIT grants passthrough."""
        self._offered_backing = session

    def init(self, granted: Granted) -> None:
        """What INIT settled (passthrough granted or not)."""
        if self._proc_fd is None:  # after the daemon's fork: /proc/self is the serving process
            self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if self._offered_backing is not None and granted.passthrough:
            self.backing_files = self._offered_backing

    def request_done(self) -> None:
        """The FUSE layer, as each request ends: the nodes it named may give their
        fds back."""
        self.table.request_done()

    def worker_started(self) -> None:
        if linux.private_fs_struct():  # a umask of its own: it may be left as a create set it
            self._thread.ids = [self.daemon_uid, self.daemon_gid, -1]

    def _ids_of(self, lower_uid: int, lower_gid: int, umask: int) -> None:
        """This thread's fsuid, fsgid and umask for a new entry (each set
        only if it differs from what the thread has)."""
        ids = getattr(self._thread, "ids", None)
        if ids is None:  # not a serving thread: its umask is the process's
            os.umask(umask)
            linux.set_fsids(lower_uid, lower_gid)
            return
        if ids[2] != umask:
            os.umask(umask)
            ids[2] = umask
        if ids[0] != lower_uid or ids[1] != lower_gid:
            linux.set_fsids(lower_uid, lower_gid)
            ids[0], ids[1] = lower_uid, lower_gid

    def _daemon_ids(self, always: bool = False) -> None:
        """The daemon's own fsuid and fsgid back on this thread: after a
        create where the thread would lose its capabilities otherwise
        (``always``: before anything that makes an inode outside a
        create, a rename's whiteout)."""
        ids = getattr(self._thread, "ids", None)
        if ids is None:  # not a serving thread: as it was
            linux.set_fsids(self.daemon_uid, self.daemon_gid)
        elif self._keep_ids and not always:
            return
        elif ids[0] != self.daemon_uid or ids[1] != self.daemon_gid:
            linux.set_fsids(self.daemon_uid, self.daemon_gid)
            ids[0], ids[1] = self.daemon_uid, self.daemon_gid

    def _reopen(self, fd: int, flags: int) -> int:
        """A new open of the inode ``fd`` holds (its magic link in
        /proc/self/fd, which the kernel resolves to the inode itself),
        looked up from the held /proc/self/fd: one path step, not four."""
        if self._proc_fd is None:
            return os.open(f"/proc/self/fd/{fd}", flags)
        return os.open(str(fd), flags, dir_fd=self._proc_fd)

    def destroy(self) -> None:
        for d in list(self._dirs.values()):
            os.close(d.fd)
        self._dirs.clear()
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

    def describe_caller(self, uid: int, gid: int) -> str:
        """-d: the caller's upper ids and the lower ids they stand for."""
        lu, lg = self.uids.to_lower(uid), self.gids.to_lower(gid)
        return (f"upper {uid}:{gid} lower {'unmapped' if lu is None else lu}:"
                f"{'unmapped' if lg is None else lg}")

    _NAMED = {"lookup": (0, 1), "mknod": (0, 1), "mkdir": (0, 1), "unlink": (0, 1),
              "rmdir": (0, 1), "create": (0, 1), "rename": (0, 1), "symlink": (1, 2),
              "link": (1, 2), "getxattr": (0, 1), "setxattr": (0, 1), "removexattr": (0, 1)}

    def describe_args(self, op: str, args: tuple) -> str:
        """-d: what a request names, as a path below the mount where the
        node's names are known ("?" for a part that is not)."""
        if op in ("forget", "forget_multi"):
            return str(args[0])
        node_at, name_at = self._NAMED.get(op, (0, None))
        path = self._path_of(args[node_at])
        if name_at is None:
            return path
        name = _shown(args[name_at])
        if op.endswith("xattr"):
            return f"{path} {name}"
        return (path.rstrip("/") + "/" + name)

    def _path_of(self, node_id: int) -> str:
        parts = []
        for _ in range(256):
            if node_id == self.table.root.node_id:
                return "/" + "/".join(reversed(parts))
            node = self.table._by_id.get(node_id)
            if node is None or not node.name:
                break
            parts.append(_shown(node.name))
            node_id = node.parent_id
        return "?/" + "/".join(reversed(parts))

    # ---- helpers ----
    def _frozen(self, st: os.stat_result) -> bool:
        return policy.is_frozen(st, self.uids, self.gids)

    def _watching(self, node: Node) -> bool:
        """Whether the watcher reports changes behind the mount to ``node``
        itself and, for a directory, to its names and listing: a fanotify
        mark of its own (watch.py)."""
        w = self.watcher
        return w is not None and w.running and node.marked

    def _attr_life(self, node: Node | None, st: os.stat_result) -> float:
        """Long where a mark reports the node's attribute and data changes:
        its own, or its directory's (which sees a change through that
        directory only, so not for a file with other links)."""
        w = self.watcher
        if w is None:
            return self.life.attr  # nothing watched: one lifetime for all (cache=timeout|forever)
        if w.running and node is not None and node.fid is not None:
            if node.marked:
                return self.life.attr
            if st.st_nlink == 1 or stat.S_ISDIR(st.st_mode):
                parent = self.table._by_id.get(node.parent_id)
                if parent is not None and parent.marked and parent.key[0] == node.key[0]:
                    return self.life.attr
        return self.unwatched.attr

    def _names_life(self, parent: Node) -> Lifetimes:
        """Long for the names in ``parent`` where its mark reports them and
        they can be expired without detaching anything (FUSE_EXPIRE_ONLY)."""
        w = self.watcher
        if w is None:
            return self.life
        if w.running and parent.marked and w.session.expire_only:
            return self.life
        return self.unwatched

    def _attr(self, st: os.stat_result, node: Node | None) -> Attr:
        # a frozen inode's attributes (and ACL) are cached as any inode's:
        # no decision is made on a GETATTR (see the module docstring)
        uid = self._uid_up(st.st_uid)
        gid = self._gid_up(st.st_gid)
        return Attr(st, self._ovf_uid if uid is None else uid, self._ovf_gid if gid is None else gid,
                    self._attr_life(node, st))

    def _entry(self, node: Node, st: os.stat_result, in_frozen_dir: bool,
               parent: Node | None) -> Entry:
        """The reply for ``node``'s name in ``parent`` (None: ROOT_NAME in the
        FUSE root, which nothing else changes)."""
        st, uid, gid, attr_timeout = self._attr(st, node)
        if in_frozen_dir:
            entry_timeout = 0.0
        elif parent is not None:
            entry_timeout = self._names_life(parent).entry
        elif node is self.table.root:
            entry_timeout = self.life.entry
        else:
            entry_timeout = self.unwatched.entry
        return Entry(node.node_id, st, uid, gid, attr_timeout, entry_timeout)

    def _absent(self, parent: Node, name: bytes) -> float:
        """The lifetime of a negative entry: long only where the watcher
        keeps the name, to expire it after a queue overflow."""
        life = self._names_life(parent)
        if life is not self.unwatched and self.watcher is not None \
                and not self.watcher.remember_negative(parent, name):
            return self.unwatched.negative
        return life.negative

    def _caller_lower_ids(self, ctx: Context) -> tuple[int, int]:
        """The caller's (lower uid, lower gid); EOVERFLOW if either id has
        no lower counterpart (it could not own anything here)."""
        lower_uid = self.uids.to_lower(ctx.uid)
        lower_gid = self.gids.to_lower(ctx.gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "caller has no lower id")
        return lower_uid, lower_gid

    def _caller_mapped(self, ctx: Context) -> bool:
        return self.uids.to_lower(ctx.uid) is not None and self.gids.to_lower(ctx.gid) is not None

    def _as_caller(self, ctx: Context, parent: Node, name: bytes, mode: int, make,
                   opened: bool = False) -> tuple[int, os.stat_result]:
        """``make(mode)`` with the thread's fsuid/fsgid set to the caller's
        lower ids and its umask to the caller's; the parent must not be
        frozen. Then the new entry ``name`` is checked to be the caller's
        (_own_new). Returns an fd of it (``opened``: the fd make returned;
        otherwise an O_PATH fd of the name, taken at once) and its stat."""
        lower_uid, lower_gid = self._caller_lower_ids(ctx)
        pst = os.fstat(parent.fd)
        policy.check_dir_write(pst, self.uids, self.gids)
        # where a new entry needs a chown (which clears set-id bits), the
        # bits come after it: never a set-uid file with the wrong owner
        setid = mode & (stat.S_ISUID | stat.S_ISGID) if self.chown_new else 0
        self._ids_of(lower_uid, lower_gid, ctx.umask)
        try:
            made = make(mode & ~setid)
        finally:
            self._daemon_ids()
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else lower_gid
        fd = made if opened else os.open(name, _O_PATH_NOFOLLOW, dir_fd=parent.fd)
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
        """The entry just made under ``name`` (_as_caller's fd and stat),
        counted as one lookup."""
        fd, st = made
        return self._entry(self.table.add(fd, st, parent.node_id, name), st, False, parent)

    def _frozen_access(self, ctx: Context, node: Node, st: os.stat_result, want: int) -> None:
        """EACCES unless the caller may ``want`` this frozen inode as an
        idmapped mount decides (mode bits, mapped group, ACL; no
        capability)."""
        acl = None
        if st.st_mode & 0o070 and not stat.S_ISLNK(st.st_mode):
            try:
                acl = os.getxattr(node.path, _ACL_ACCESS)
            except OSError:
                pass
        groups = _CallerGroups(ctx)  # read from /proc only where a decision needs them
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
            return self._entry(root, os.fstat(root.fd), False, None)
        parent = self.table.get(parent_id)
        pst = os.fstat(parent.fd)
        frozen_dir = self._frozen(pst)
        if frozen_dir:  # a lookup searches the directory: decided as the kernel would
            self._frozen_access(ctx, parent, pst, policy.MAY_EXEC)
        try:
            node, st = self.table.lookup_at(parent, self._name(name))
        except FileNotFoundError:
            return NEGATIVE if frozen_dir else Entry(0, None, 0, 0, 0.0, self._absent(parent, name))
        return self._entry(node, st, frozen_dir, parent)

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
        self._dirs[fh] = DirStream(fh, self._frozen(os.fstat(fh)))

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
        policy.check_link(st, self._caller_mapped(ctx), os.fstat(parent.fd), self.uids, self.gids)
        # the held inode itself, not whatever a name points to now
        os.link(node.path, self._name(name), dst_dir_fd=parent.fd, follow_symlinks=True)
        fd = os.dup(node.fd)
        st = os.fstat(fd)
        return self._entry(self.table.add(fd, st, parent_id, name), st, False, parent)

    def _delete(self, parent_id: int, name: bytes, remove) -> None:
        parent = self.table.get(parent_id)
        name = self._name(name)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        policy.check_delete(st, os.fstat(parent.fd), self.uids, self.gids)
        remove(name, dir_fd=parent.fd)
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
                            new_st is not None or self._caller_mapped(ctx), self.uids, self.gids)
        if flags:
            if flags & linux.RENAME_WHITEOUT:  # the whiteout is the daemon's, as before
                self._daemon_ids(always=True)
            linux.renameat2(old_dir.fd, name, new_dir.fd, newname, flags)
        else:
            os.rename(name, newname, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)
        if not flags & linux.RENAME_EXCHANGE:
            self._released(new_st)

    # ---- attributes ----
    def getattr(self, ctx: Context, node_id: int, fh: int | None) -> Attr:
        if node_id == ROOT_ID and self.root_below:  # the daemon's own, never cached
            return Attr(os.fstat(self.table.root.fd), self.daemon_uid, self.daemon_gid, 0.0)
        if fh is not None:  # the open file's node, without reopening its fd
            return self._attr(os.fstat(fh), self.table._by_id.get(node_id))
        node = self.table.get(node_id)
        return self._attr(os.fstat(node.fd), node)

    def readlink(self, ctx: Context, node_id: int) -> bytes:
        return os.readlink(b"", dir_fd=self.table.get(node_id).fd)

    def statfs(self, ctx: Context, node_id: int):
        return os.fstatvfs(self.table.root.fd)

    def setattr(self, ctx: Context, node_id: int, attr: SetAttr, fh: int | None) -> Attr:
        """Applied in the order libfuse's high-level API used: mode, owner,
        size, times. A SETATTR with nothing to set (chown -1 -1) still
        reaches here: refused on a frozen inode, a ctime update otherwise."""
        node = self.table.get(node_id)
        if stat.S_ISLNK(node.mode) and not self.symlink_attrs:
            raise OSError(errno.EOPNOTSUPP, "the lower's setattr of a symlink reaches its target")
        fd = node.fd
        st = os.fstat(fd)
        to_set = attr.valid
        if to_set & SET_ATTR_MODE:
            policy.check_modify(st, self.uids, self.gids, "chmod")
            mode = stat.S_IMODE(attr.mode)
            if mode & stat.S_ISGID and not self._may_keep_sgid(
                    ctx, st, attr.gid if to_set & SET_ATTR_GID else None):
                mode &= ~stat.S_ISGID
            if fh is not None:
                os.fchmod(fh, mode)
            elif stat.S_ISLNK(node.mode):
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            else:
                os.chmod(node.path, mode)
            st = os.fstat(fd)
        if to_set & (SET_ATTR_UID | SET_ATTR_GID):
            self._chown(ctx, node, st, attr.uid if to_set & SET_ATTR_UID else UNCHANGED,
                        attr.gid if to_set & SET_ATTR_GID else UNCHANGED)
            st = os.fstat(fd)
        if to_set & SET_ATTR_SIZE:
            policy.check_modify(st, self.uids, self.gids, "write")
            if to_set & SET_ATTR_KILL_SUIDGID:  # a truncate by a caller without CAP_FSETID
                self._kill_suidgid(ctx, node, fh, st)
            if fh is not None:
                os.ftruncate(fh, attr.size)
            elif not node.is_reg():
                raise OSError(errno.EINVAL, "truncate of a non-regular file")
            else:
                os.truncate(node.path, attr.size)
        times = to_set & (SET_ATTR_ATIME | SET_ATTR_MTIME | SET_ATTR_ATIME_NOW | SET_ATTR_MTIME_NOW)
        if times:
            atime = (0, linux.UTIME_NOW) if to_set & SET_ATTR_ATIME_NOW else (
                attr.atime if to_set & SET_ATTR_ATIME else (0, linux.UTIME_OMIT))
            mtime = (0, linux.UTIME_NOW) if to_set & SET_ATTR_MTIME_NOW else (
                attr.mtime if to_set & SET_ATTR_MTIME else (0, linux.UTIME_OMIT))
            policy.check_modify(st, self.uids, self.gids, policy.utimes_kind(atime[1], mtime[1]))
            linux.utimens_fd(fd, atime, mtime)
        if not to_set & (SET_ATTR_MODE | SET_ATTR_UID | SET_ATTR_GID | SET_ATTR_SIZE) and not times:
            # Nothing to set: chown(-1, -1), where notify_change refuses a
            # frozen inode and otherwise only ctime moves (and the lower's
            # chown clears set-uid, as any chown does) -- or the privileges a
            # write or truncate drops (file_remove_privs: only ATTR_KILL_*
            # was left), where a chown of the lower would clear set-uid for
            # a caller with CAP_FSETID too
            if _caller_in_chown(ctx):
                self._chown(ctx, node, st, UNCHANGED, UNCHANGED)
            else:
                self._remove_privs(ctx, node, st)
        return self._attr(os.fstat(fd), node)

    def _remove_privs(self, ctx: Context, node: Node, st: os.stat_result) -> None:
        """The empty SETATTR of file_remove_privs (a write, truncate or
        passed-through write that finds set-id bits or a capability): the
        capability went by its own REMOVEXATTR; the bits go as
        setattr_should_drop_suidgid says, unless the caller holds
        CAP_FSETID (in the initial namespace: the kernel's capable()). The
        kernel sends set-uid and group-exec set-gid as a mode instead where
        FUSE_HANDLE_KILLPRIV_V2 is off; then only set-gid without group exec
        is left to clear here."""
        policy.check_chown(st, self.uids, self.gids, ctx.uid)
        if not _caller_has_cap(ctx, CAP_FSETID):
            self._kill_suidgid(ctx, node, None, st)

    def write_kills_suidgid(self, ctx: Context, node_id: int, fh: int) -> bool:
        """FUSE_WRITE_KILL_SUIDGID: the kernel asks, for a write by a caller
        without CAP_FSETID (any file), what file_remove_privs would clear."""
        self._kill_suidgid(ctx, self.table.get(node_id), fh, os.fstat(fh))
        return True

    def _kill_suidgid(self, ctx: Context, node: Node, fh: int | None, st: os.stat_result) -> None:
        """setattr_should_drop_suidgid for a caller without CAP_FSETID
        (the kernel checked that, and sent the kill bit)."""
        mode = st.st_mode
        if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
            return
        keep_sgid = bool(mode & stat.S_ISGID) and not mode & stat.S_IXGRP and \
            self._may_keep_sgid(ctx, st, None)
        new = policy.killed_suidgid_mode(mode, keep_sgid)
        if new != stat.S_IMODE(mode):
            if fh is not None:
                os.fchmod(fh, new)
            else:
                os.chmod(node.path, new)

    def _chown(self, ctx: Context, node: Node, st: os.stat_result, uid: int, gid: int) -> None:
        lower_uid = -1 if uid == UNCHANGED else self.uids.to_lower(uid)
        lower_gid = -1 if gid == UNCHANGED else self.gids.to_lower(gid)
        if lower_uid is None or lower_gid is None:
            raise OSError(errno.EOVERFLOW, "id has no lower counterpart")
        policy.check_chown(st, self.uids, self.gids, ctx.uid, lower_uid, lower_gid)
        mode = st.st_mode
        if (not stat.S_ISDIR(mode) and policy.setid_always_cleared(mode)
                and (self._frozen(st) or not self._caller_owns(ctx, st))):
            # the set-uid (or group-exec set-gid) bit a chown clears is a
            # mode change, which notify_change lets only the owner (or
            # CAP_FOWNER over a mapped inode) make; with
            # FUSE_HANDLE_KILLPRIV_V2 the kernel leaves that check to us
            raise OSError(errno.EPERM, "chown: set-id bits need clearing by the owner")
        drop_sgid = bool(st.st_mode & stat.S_ISGID) and self._chown_drops_sgid(ctx, st)
        if (drop_sgid and lower_uid == -1 and lower_gid == -1
                and not self._caller_owns(ctx, st)):
            # clearing the bit is a mode change, which only the owner may
            # make (a write's clearing comes as the same empty SETATTR, and
            # is forced)
            raise OSError(errno.EPERM, "chown: set-gid bit needs clearing by the owner")
        linux.chown_fd(node.fd, lower_uid, lower_gid)
        if drop_sgid:
            os.chmod(node.path, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

    def _caller_owns(self, ctx: Context, st: os.stat_result) -> bool:
        """inode_owner_or_capable: the caller's fsuid owns it, or it holds
        CAP_FOWNER over it."""
        owner = self.idmap.uid_to_upper(st.st_uid)
        return ctx.uid == owner or self._caller_capable(
            CAP_FOWNER, ctx.pid, owner, self.idmap.gid_to_upper(st.st_gid))

    def _may_keep_sgid(self, ctx: Context, st: os.stat_result, new_upper_gid: int | None) -> bool:
        """setattr_copy's rule, which the upper kernel's FUSE client does not
        apply and the daemon (CAP_FSETID) would not meet: a mode keeps
        S_ISGID only for a caller in the file's group or with CAP_FSETID
        over it. It is what clears the bit when a write by someone outside
        the group kills set-uid (the kernel sends the mode with S_ISGID
        still in it)."""
        upper_gid = self.idmap.gid_to_upper(st.st_gid) if new_upper_gid is None else new_upper_gid
        if ctx.gid == upper_gid or upper_gid in ctx.groups():
            return True
        return self._caller_capable(CAP_FSETID, ctx.pid, self.idmap.uid_to_upper(st.st_uid), upper_gid)

    def _chown_drops_sgid(self, ctx: Context, st: os.stat_result) -> bool:
        """The kernel's rule for S_ISGID without group exec on chown, which
        the upper kernel's FUSE client does not apply: needs the caller's
        groups and capabilities (from /proc/PID)."""
        upper_gid = self.idmap.gid_to_upper(st.st_gid)
        in_group = ctx.gid == upper_gid or upper_gid in ctx.groups()
        capable = not in_group and self._caller_capable(
            CAP_FSETID, ctx.pid, self.idmap.uid_to_upper(st.st_uid), upper_gid)
        return policy.chown_drops_sgid(st, in_group, capable)

    def _caller_capable(self, cap: int, pid: int, upper_uid: int, upper_gid: int) -> bool:
        """capable_wrt_inode_uidgid for the caller: ``cap`` effective in its
        user namespace, and (outside the daemon's namespace) the inode's ids
        mapped in that namespace."""
        if not _caller_cap_eff(pid) >> cap & 1:
            return False
        if _in_daemon_userns(pid):
            return True
        try:
            with open(f"/proc/{pid}/uid_map") as u, open(f"/proc/{pid}/gid_map") as g:
                return policy.id_in_map(u.read(), upper_uid) and policy.id_in_map(g.read(), upper_gid)
        except OSError:  # the caller is gone: no privilege to act on
            return False

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
        fh, backing = self.table.opened(node, fd, flags, uid, self._passthrough(fd, st, fresh))
        if not backing:
            _buffered(fh, flags)
        return fh, backing

    def _passthrough(self, fd: int, st: os.stat_result, fresh: bool = False):
        """What chooses, at the first open of an inode, whether its opens
        are passed through (InodeTable.opened): not when the daemon must see
        the writes (set-id bits a write clears, file capabilities) or every
        access (frozen)."""
        if self.backing_files is None:
            return None

        def choose() -> int:
            mode = st.st_mode
            if policy.setid_always_cleared(mode):
                return 0
            if self._frozen(st):
                return 0
            if not fresh:  # a file just made has none
                try:
                    os.getxattr(fd, "security.capability")
                    return 0
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        return 0
            try:
                return self.backing_files.backing_open(fd)
            except OSError as e:
                if e.errno == errno.EPERM:  # no CAP_SYS_ADMIN after all: stop asking
                    log.warning("passthrough refused (%s); reads and writes go through the daemon",
                                e.strerror)
                    self.backing_files = None
                return 0  # e.g. EINVAL: a lower on overlayfs is stacked too deep
        return choose

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
        return self._entry(node, st, False, parent), Opened(fh, False, backing, _whole_appends(flags, backing))

    def tmpfile(self, ctx: Context, parent_id: int, mode: int, flags: int) -> tuple[Entry, Opened]:
        """O_TMPFILE: an unnamed file in ``parent``, born the caller's (as a
        create), which linkat can give a name through the mount."""
        parent = self.table.get(parent_id)
        lower_uid, lower_gid = self._caller_lower_ids(ctx)
        pst = os.fstat(parent.fd)
        policy.check_dir_write(pst, self.uids, self.gids)
        self.table.admit(ctx.uid)  # before the file exists: a refused one makes none
        dir_fd = os.open(parent.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._ids_of(lower_uid, lower_gid, ctx.umask)
            try:
                fd = os.open(".", (flags & ~(os.O_NOCTTY | os.O_CREAT | os.O_EXCL | os.O_APPEND))
                             | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            finally:
                self._daemon_ids()
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
        return self._entry(node, st, False, parent), Opened(fh, False, backing, _whole_appends(flags, backing))

    def handed_out(self, node_id: int, fh: int, directory: bool = False) -> bool:
        """Whether ``fh`` is an open file (directory) of ``node_id``."""
        if directory:
            return fh in self._dirs and self.table.handed_out(fh, node_id, True)
        return self.table.handed_out(fh, node_id, False)

    def release(self, node_id: int, fh: int) -> None:
        if self.table.handed_out(fh, node_id, True):
            log.warning("RELEASE of fh %d, a directory's", fh)
            return
        self.table.closed(fh, self._backing_close, node_id)

    def _backing_close(self, backing_id: int) -> None:
        session = self.backing_files or self._offered_backing
        try:
            session.backing_close(backing_id)
        except OSError as e:
            log.warning("passthrough backing file %d not given back: %s", backing_id, e.strerror)

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
        if not node.is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        uid = ctx.uid
        self.table.admit(uid)
        fd = self._reopen(node.fd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            frozen = self._frozen(st)
            if frozen:
                self._frozen_access(ctx, node, st, policy.MAY_READ)
        except BaseException:
            os.close(fd)
            raise
        self.table.dir_opened(fd, uid, node_id)
        self._dirs[fd] = DirStream(fd, frozen)
        # the kernel may keep the listing while the watcher invalidates the
        # directory on every change behind the mount (frozen ones: never)
        return Opened(fd, not frozen and self._watching(node))

    def readdir(self, node_id: int, fh: int, off: int) -> DirStream:
        stream = self._dirs[fh]
        stream.seek(off)
        return stream

    def readdir_entry(self, ctx: Context, parent_id: int, fh: int, name: bytes,
                      d_type: int) -> Entry | None:
        """A readdirplus entry with attributes (one lookup), or None: the
        dot entries, a vanished name, and all entries of a frozen directory
        (the kernel then looks each up when it needs it, and lookup decides
        whether the caller may search the directory)."""
        stream = self._dirs[fh]
        if stream.frozen or name in (b".", b".."):
            return None
        try:
            fd, st = self.table.open_at(fh, name)
        except OSError:
            return None
        return self._entry(self.table.add(fd, st, parent_id, name), st, False,
                           self.table._by_id.get(parent_id))

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
        if name.startswith(b"user."):  # the only names whose read asks permission
            st = os.fstat(node.fd)
            if self._frozen(st):
                self._frozen_access(ctx, node, st, policy.MAY_READ)
        value = os.getxattr(node.path, name)
        return xattrs.to_upper(name, value, self.idmap)

    def listxattr(self, ctx: Context, node_id: int) -> bytes:
        names = os.listxattr(self.table.get(node_id).path)
        if any(n.startswith("trusted.") for n in names) and not _caller_has_cap(ctx, _CAP_SYS_ADMIN):
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


# FS_IOC_GETFLAGS, FS_IOC_GETVERSION, FS_IOC_FSGETXATTR (and their sizes);
# FS_IOC_SETFLAGS, FS_IOC_SETVERSION, FS_IOC_FSSETXATTR
_IOCTL_READ = {0x80086601: 8, 0x80087601: 8, 0x801C581F: 28}
_IOCTL_SET = {0x40086602, 0x40087602, 0x401C5820}


def _shown(raw: bytes) -> str:
    """A name for the -d log, on one line whatever its bytes: a caller's
    name with a newline in it must not write a line of its own."""
    text = raw.decode(errors="backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _whole_appends(flags: int, backing: int) -> bool:
    """An O_APPEND open the daemon serves bypasses the FUSE page cache
    (FOPEN_DIRECT_IO): the kernel then sends each write() whole, as one
    WRITE the lower appends at once, where through the page cache it splits
    a write at a page it does not hold into two, and another writer of the
    same lower could append between them. A passed-through open appends in
    the lower itself."""
    return bool(flags & os.O_APPEND) and not backing

"""Mount lifecycle: serve a mount (foreground or daemon), wait until a mount
is live, unmount cleanly, and a context manager for Python callers."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from . import linux
from .idmap import Extent, IdMap, build_idmap, parse_extents
from .watch import Shrinker

FSTYPE = "fuse.shiftfs"


@dataclass
class MountOptions:
    """What the daemon is asked for, after the command line is parsed."""

    foreground: bool = False
    debug: bool = False
    read_only: bool = False
    suid: bool = False
    dev: bool = False
    kernel_flags: list[str] = field(default_factory=list)  # noexec, noatime, ...
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 1.0
    timeouts_given: bool = False  # any *_timeout= on the command line
    cache: str = "auto"  # auto | watch | timeout | forever
    passthrough: str = "auto"  # auto (where libfuse, kernel and privilege allow) | off
    threads: bool = True

    def mount_options(self, lower: str) -> list[str]:
        """The -o words for libfuse and the kernel."""
        opts = [
            "fsname=" + lower.replace("\\", "\\\\").replace(",", "\\,"),
            "subtype=shiftfs",
            "allow_other",
            "default_permissions",
            "suid" if self.suid else "nosuid",
            "dev" if self.dev else "nodev",
            "ro" if self.read_only else "rw",
        ]
        return opts + list(self.kernel_flags)


log = logging.getLogger("shiftfs")


def setup_logging(foreground: bool) -> None:
    """Where the daemon's own messages go: stderr in the foreground, syslog
    (the journal) once daemonized, since libfuse then points stderr at
    /dev/null. SHIFTFS_SYSLOG names another syslog socket (tests)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers.clear()
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    fmt = "shiftfs: %(message)s"
    if not foreground:
        logging.raiseExceptions = False  # no syslog listening: drop the line, never print a trace
        try:
            handler = logging.handlers.SysLogHandler(
                os.environ.get("SHIFTFS_SYSLOG", "/dev/log"),
                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            fmt = "shiftfs[%(process)d]: %(message)s"
        except OSError:
            pass  # no syslog here: stderr until libfuse closes it
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)


WORKERS = 3  # pool threads for requests that may block (session.py); the reader serves the rest
READ_AHEAD_KB = 1024  # sequential reads in 1 MiB requests (the kernel default is 128 KiB)


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the read-ahead of the FUSE mount at ``mountpoint`` (its bdi,
    /sys/class/bdi/MAJOR:MINOR). Called from INIT: the mount is in
    mountinfo by then, and nothing here touches the mount itself (which
    would wait for the very INIT reply being prepared). Root only; False
    if it could not be done."""
    try:
        devs = [dev for dev, _src, mp, fstype in mountinfo()
                if mp == mountpoint and fstype.startswith("fuse")]
        if not devs:
            return False
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))  # the last (topmost) mount there wins
        return True
    except (OSError, ValueError):
        return False


def _raise_nofile() -> None:
    """Room for the inode table's fds (watch.Shrinker keeps them under 60 %
    of what this leaves) and the files callers open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # as root, up to the kernel's ceiling (CAP_SYS_RESOURCE)
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            ceiling = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
        return
    except (OSError, ValueError):
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _daemonize():
    """Fork before any thread starts: the parent waits until the child says
    whether the mount is live and exits 0 or 1 with it; the child serves in
    a session of its own. Returns the child's ``report(ok)``."""
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok == b"1" else 1)
    os.close(r)
    os.setsid()

    def report(ok: bool) -> None:
        os.write(w, b"1" if ok else b"0")
        os.close(w)
        if ok:
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
    return report


def _own_device() -> tuple[int | None, bool]:
    """/dev/fuse opened for a mount the daemon makes itself (root only):
    (fd, whether INIT is synchronous, FUSE_DEV_IOC_SYNC_INIT, Linux 6.18+).
    (None, False) where we cannot mount ourselves; libfuse mounts then."""
    if os.geteuid() != 0:
        return None, False
    import fcntl
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None, False
    try:
        fcntl.ioctl(fd, linux.FUSE_DEV_IOC_SYNC_INIT)
    except OSError:  # ENOTTY: INIT is answered after mount(2) returns
        return fd, False
    return fd, True


def mounts_itself() -> bool:
    """Whether the daemon makes its FUSE mount itself, with the new mount
    API (Linux 5.2+): as root, or as the owner of a user namespace with a
    mount namespace of its own. Elsewhere fusermount3 mounts (libfuse.py)."""
    if os.geteuid() != 0:
        return False
    try:
        os.close(linux.fsopen("fuse"))
    except OSError:
        return False
    return True


def _fuse_words(fd: int, lower: str, options: MountOptions) -> list[str]:
    # the source and fstype say fsname= and subtype=
    return [f"fd={fd}", f"user_id={os.geteuid()}", f"group_id={os.getegid()}"] + [
        w for w in options.mount_options(lower) if not w.startswith(("fsname=", "subtype="))]


def handles_killpriv_v2() -> bool:
    """Whether a mount made now by this process clears set-id bits itself
    (FUSE_HANDLE_KILLPRIV_V2, offered by Linux 5.11+, negotiated by our own
    INIT reply): as root, where the daemon may clear them on any file."""
    return os.geteuid() == 0


def _open_mount_point(mp: str) -> int:
    """The mount point held as an fd from the start: a root daemon mounts
    on, and later unmounts, what was checked, never a path resolved again
    (a user owning a directory on the way could swap in a symlink and send
    the mount, or the unmount, onto /etc, /proc, another mount)."""
    try:
        return linux.open_dir_no_symlinks(mp)  # mp is a realpath: no symlink in it now
    except OSError as e:
        if e.errno != errno.ENOSYS:  # no openat2 (before Linux 5.6)
            raise
    return os.open(mp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _mount_point_of(mnt_id: int) -> str | None:
    for fields in _mountinfo_fields():
        if int(fields[0]) == mnt_id:
            return _unescape(fields[4])
    return None


def _unmount_own(mnt_id: int) -> None:
    """Detach our own mount, wherever it is now (a parent may have been
    renamed), and nothing else: its current path is opened without
    following symlinks and unmounted through the fd only if that fd is on
    our mount (not on one stacked over it)."""
    mp = _mount_point_of(mnt_id)
    if mp is None:
        return  # unmounted already
    fd = _open_mount_point(mp)
    try:
        if linux.mount_id(fd) == mnt_id:
            linux.umount2(f"/proc/self/fd/{fd}", linux.MNT_DETACH)
    finally:
        os.close(fd)


def _mount_below(fd: int, lower: str, mp_fd: int, options: MountOptions) -> int:
    """A FUSE filesystem served on ``fd`` made with fsopen/fsmount, and its
    directory ops.ROOT_NAME (the lower's root) bind-mounted on the directory
    ``mp_fd`` holds; the FUSE root itself is never attached. See
    ops.ROOT_NAME for why. Returns the new mount's id."""
    from .ops import ROOT_NAME
    attrs = 0
    fs_fd = linux.fsopen("fuse")
    try:
        for key, value in (("source", lower), ("subtype", FSTYPE.split(".", 1)[1]),
                           ("rootmode", "40000")):
            linux.fsconfig(fs_fd, key, value)
        for w in _fuse_words(fd, lower, options):
            if w in linux.MOUNT_ATTRS:
                attrs |= linux.MOUNT_ATTRS[w]
                if w == "ro":  # the superblock's as well as the mount's, as mount(2) does
                    linux.fsconfig(fs_fd, "ro")
            else:
                key, eq, value = w.partition("=")
                linux.fsconfig(fs_fd, key, value if eq else None)
        linux.fsconfig_create(fs_fd)  # with a synchronous INIT, answered by now
        fuse_root = linux.fsmount(fs_fd, attrs)
    finally:
        os.close(fs_fd)
    try:
        tree = linux.open_tree_clone(fuse_root, ROOT_NAME.decode())
    finally:
        os.close(fuse_root)  # detached: it goes, the bind keeps the superblock
    try:
        mnt_id = linux.mount_id(tree)  # kept by the move; read first, so a mount made is known
        linux.move_mount_to(tree, mp_fd)
        return mnt_id
    finally:
        os.close(tree)


WATCHED_LIFETIME = 3600.0  # what the kernel may cache when fanotify tells us of changes
FOREVER_LIFETIME = 86400.0  # -o cache=forever: the lower does not change behind the mount


def _make_watch(operations, session, lower: str, options: MountOptions):
    """-o cache=auto|watch|timeout|forever: a Watcher (fanotify inode marks
    on what the kernel holds, root or not) or None. With one, replies for
    nodes whose changes a mark reports carry long lifetimes (unless
    timeouts were given), the others short ones; without, all stay short.
    cache=watch refuses to mount without it."""
    from .ops import Lifetimes
    from .watch import Watcher
    if options.cache == "timeout":
        return None
    if options.cache == "forever":  # a lower nobody else changes (an image layer)
        if not options.timeouts_given:
            life = operations.life
            life.attr = life.entry = life.negative = FOREVER_LIFETIME
        return None
    try:
        watcher = Watcher(operations.table, session)
    except OSError as e:
        if options.cache == "watch":
            raise OSError(e.errno, f"-o cache=watch: no fanotify on {lower}: {e.strerror}") from None
        log.warning("changes behind the mount show within %g s (no fanotify on %s: %s)",
                    options.attr_timeout, lower, e.strerror or e)
        return None
    life = operations.life
    operations.unwatched = Lifetimes(life.attr, life.entry, life.negative)
    if not options.timeouts_given:
        life.attr = life.entry = life.negative = WATCHED_LIFETIME
    operations.watcher = watcher
    return watcher


# lowers whose calls may block for long (network, another FUSE daemon):
# every request there goes to the session's pool
_SLOW_LOWERS = ("fuse", "nfs", "cifs", "smb3", "9p", "ceph", "glusterfs", "sshfs")


def serve(lower: str, mountpoint: str, idmap: IdMap, options: MountOptions) -> int:
    """Mount and serve until unmounted. Without ``foreground`` the process
    forks once the mount is live, so the caller returns only then. The
    process that returns is the mount's supervisor (supervisor.py): it
    holds /dev/fuse and the mount, and forks the server that does the
    work, again whenever one dies."""
    from .supervisor import GRANT_PASSTHROUGH, Supervisor, status_path

    setup_logging(options.foreground)
    linux.limit_mmap_threshold()
    _raise_nofile()
    if os.geteuid() == 0 and not linux.keep_caps_across_fsuid():
        print("shiftfs: cannot set SECBIT_NO_SETUID_FIXUP; new files may get the wrong owner",
              file=sys.stderr)
    own = mounts_itself()
    mp = os.path.realpath(mountpoint)
    status = status_path(mp)  # now: once mounted, a stat of the mount point waits for INIT
    mp_fd = None
    if own:  # we mount ourselves: held from here on (_open_mount_point)
        try:
            mp_fd = _open_mount_point(mp)
        except OSError as e:
            print(f"shiftfs: mount point {mountpoint}: {e.strerror or e}", file=sys.stderr)
            return 1
    report = None if options.foreground else _daemonize()

    def fail(what: str) -> int:
        print(f"shiftfs: mount of {mountpoint} failed: {what}", file=sys.stderr)
        if report:
            report(False)
        return 1

    fusermount = None
    if own:
        device_fd, sync_init = _own_device()
        if device_fd is None:
            return fail("cannot open /dev/fuse")
    else:  # no privilege: fusermount3 mounts (through libfuse) and hands us the fd
        from .libfuse import FusermountMount
        try:
            fusermount = FusermountMount(mp, options.mount_options(lower))
        except OSError as e:
            return fail(e.strerror or str(e))
        device_fd, sync_init = fusermount.fd, False
    resume = {"lower": lower, "mountpoint": mountpoint, "own": own, "mountpoint_real": mp,
              "uidmap": [str(e) for e in idmap.uids.extents],
              "gidmap": [str(e) for e in idmap.gids.extents],
              "options": dataclasses.asdict(options), "mnt_id": None}
    sup = Supervisor(device_fd, mp, _server_starter(lower, mountpoint, idmap, options, device_fd,
                                                    own), lambda: None, resume, status=status)
    sup.fork_server(restored=False)  # it answers INIT (and the lookup of the root below)
    if own:
        try:
            try:
                mnt_id = _mount_below(device_fd, lower, mp_fd, options)
            finally:
                os.close(mp_fd)
        except OSError as e:
            _end_server(sup)
            return fail(e.strerror or str(e))
        resume["mnt_id"] = mnt_id
        sup.unmount = lambda: _unmount_own(mnt_id)
    else:
        sup.unmount = fusermount.unmount
    try:
        if not sup.wait_ready(20):
            raise OSError(errno.EIO, "the server did not answer INIT")
    except BaseException as e:  # noqa: B902 (never a mount left without its server)
        sup.unmount()
        _end_server(sup)
        sup.remove_status()
        return fail(e.strerror if isinstance(e, OSError) else repr(e))
    set_read_ahead(mp, READ_AHEAD_KB)
    log.info("serving %s at %s%s", lower, mountpoint, " (file data passed through)"
             if sup.journal.grants()[1] & GRANT_PASSTHROUGH else "")
    if options.debug:
        log.info("INIT was %s", "synchronous (FUSE_DEV_IOC_SYNC_INIT)" if sync_init
                 else "asynchronous (no FUSE_DEV_IOC_SYNC_INIT here)")
        log.info("the mount shows %s", "the FUSE root's directory 'root' (ACLs of the root cached)"
                 if own else "the FUSE root")
    if report:
        report(True)
    return sup.run()


def resume(fd: int) -> int:
    """``shiftfs --resume FD``: a supervisor re-executed by an upgrade
    takes over the mount from the state its predecessor left in ``fd``."""
    from .supervisor import Held, NodeJournal, Supervisor

    with os.fdopen(fd, "rb") as f:
        state = json.load(f)
    options = MountOptions(**state["options"])
    setup_logging(options.foreground)
    idmap = build_idmap(parse_extents(" ".join(state["uidmap"])),
                        parse_extents(" ".join(state["gidmap"])))
    lower, mountpoint, own = state["lower"], state["mountpoint"], state["own"]
    device_fd = state["device_fd"]
    held = {int(fh): Held(*v) for fh, v in state["held"].items()}
    for fd_ in [device_fd, state["journal_fd"]] + [h.fd for h in held.values()]:
        os.set_inheritable(fd_, False)
    mp = state["mountpoint_real"]  # never resolved again: the mount has no server now
    if own:
        mnt_id = state["mnt_id"]
        end = lambda: _unmount_own(mnt_id)  # noqa: E731
    else:  # the libfuse session that mounted went with the old program: fusermount3 -u -z
        end = lambda: unmount(mp, lazy=True)  # noqa: E731
    sup = Supervisor(device_fd, mp, _server_starter(lower, mountpoint, idmap, options, device_fd,
                                                    own), end, state,
                     journal=NodeJournal(state["journal_fd"]), held=held,
                     restarts=state["restarts"], status=state["status"])
    sup.fork_server(restored=True)
    log.warning("upgraded: server %d serves %s", sup.server_pid, mountpoint)
    return sup.run()


def _end_server(sup) -> None:
    try:
        os.kill(sup.server_pid, signal.SIGKILL)
        os.waitpid(sup.server_pid, 0)
    except OSError:
        pass


def _watch_restored(table, watcher) -> None:
    """A new server's watcher marks the directories (and linked files) the
    kernel still holds, as the dead server's did: each reopened by handle."""
    for node in table.nodes():
        if not (node.is_dir() or node.opens):
            continue
        try:
            if node.fd < 0:
                table._reopen(node)
            watcher.added(node, os.fstat(node.fd))
        except OSError:
            continue  # gone: it answers ESTALE when named


def _server_starter(lower, mountpoint, idmap, options, device_fd, own):
    def start(journal, sock, held, restored) -> int:
        return _server(lower, mountpoint, idmap, options, device_fd, own, journal, sock, held,
                       restored)
    return start


def _server(lower, mountpoint, idmap, options, device_fd, own, journal, sock, held,
            restored) -> int:
    """A server (in a child of the supervisor): serve the mount until it
    ends (exit 0) or this process dies (the supervisor starts another).
    ``restored``: take over from a dead server, whose nodes ``journal``
    names and whose open files ``held`` are (at their fh numbers)."""
    from .filesystem import Granted
    from .ops import Lifetimes, Operations
    from .session import MAX_WRITE, Session
    from .supervisor import (GRANT_EXPIRE_ONLY, GRANT_KILLPRIV_V2, GRANT_PASSTHROUGH,
                             GRANT_RESEND, FdStore)

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not options.foreground:  # a daemon's server speaks to syslog only (setup_logging)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    root = os.geteuid() == 0
    operations = Operations(lower, idmap, Lifetimes(options.attr_timeout, options.entry_timeout,
                                                    options.negative_timeout), own)
    if not restored:
        lacks = operations.lacks()
        if lacks:
            log.warning("the lower %s (%s) lacks %s", lower, operations.lower_type or "?",
                        "; ".join(lacks))
    table = operations.table
    granted = None
    if restored:
        table.restore(journal, held)
        for fh, h in held.items():
            if h.flags & os.O_DIRECTORY:
                operations.resume_dir(fh)
        minor, grants = journal.grants()
        granted = Granted(minor, bool(grants & GRANT_PASSTHROUGH), bool(grants & GRANT_KILLPRIV_V2),
                          bool(grants & GRANT_EXPIRE_ONLY), MAX_WRITE, bool(grants & GRANT_RESEND))
    else:
        table.journal = journal
    store = FdStore(sock)
    table.store = store
    passthrough = options.passthrough != "off" and root
    session = Session(operations, device_fd, passthrough=passthrough, killpriv_v2=root,
                      max_readahead=READ_AHEAD_KB * 1024, debug=options.debug,
                      slow=operations.lower_type.startswith(_SLOW_LOWERS),
                      pool_threads=WORKERS if options.threads else 1, granted=granted)
    if passthrough:
        operations.offer_passthrough(session)
    try:
        watcher = _make_watch(operations, session, lower, options)
    except OSError as e:
        log.error("%s", e.strerror)
        return 2
    if restored and watcher is not None:
        _watch_restored(table, watcher)
    session.start()
    if restored:
        if watcher is not None:  # what changed while no server watched
            watcher.expire_all()
        if granted.resend and session.resend() == 0:
            log.info("server %d took over: requests the dead one had read are resent", os.getpid())
        else:
            log.warning("server %d took over; this kernel cannot resend the requests the dead "
                        "one had read (Linux 6.9+): their callers wait until killed", os.getpid())
    else:
        if not session.inited.wait(30) or session.init_error is not None:
            log.error("no INIT from the kernel: %s", session.init_error)
            return 2
        g = session.granted
        journal.set_grants(g.minor, GRANT_PASSTHROUGH * g.passthrough
                           + GRANT_KILLPRIV_V2 * g.killpriv_v2 + GRANT_EXPIRE_ONLY * g.expire_only
                           + GRANT_RESEND * g.resend)
        if options.debug:
            log.info("set-id bits on write and truncate cleared by %s",
                     "the daemon (FUSE_HANDLE_KILLPRIV_V2)" if g.killpriv_v2 else "the kernel")
    store.ready()
    if watcher is not None:
        watcher.start()
    # the table's fds stay well inside RLIMIT_NOFILE (open files need some too)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    table.high, table.low = int(limit * 0.6), int(limit * 0.4)
    Shrinker(table, session).start()
    session.wait(None, signals=False)
    return 0 if session.unmounted else 1


# ---- looking at mounts ---------------------------------------------------------

def _unescape(field_text: str) -> str:
    return field_text.encode().decode("unicode_escape")


def _mountinfo_fields() -> Iterator[list[str]]:
    """The fields of each /proc/self/mountinfo line, in mount order (mount
    id, parent id, MAJOR:MINOR, root, mount point, ..., "-", fstype,
    source, ...), still escaped."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            yield line.split()


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(device MAJOR:MINOR, source, mount point, fstype) from
    /proc/self/mountinfo, in mount order."""
    result = []
    for fields in _mountinfo_fields():
        sep = fields.index("-")
        result.append((fields[2], _unescape(fields[sep + 2]), _unescape(fields[4]),
                       fields[sep + 1]))
    return result


def mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, fstype) from /proc/self/mountinfo."""
    return [(source, mp, fstype) for _dev, source, mp, fstype in mountinfo()]


def is_mounted(mountpoint: str, fstype: str | None = FSTYPE) -> bool:
    target = os.path.realpath(mountpoint)
    return any(mp == target and (fstype is None or t == fstype) for _s, mp, t in mounts())


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """fusermount3 -u (-z for lazy), falling back to umount(8)."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"unmount of {mountpoint} failed: {result.stderr.strip()}")


def extent_args(flag: str, extents: Sequence[Extent]) -> list[str]:
    args = []
    for e in extents:
        args += [flag, str(e)]
    return args


class MountError(OSError):
    """The shiftfs child could not mount; the message carries its stderr."""


def _extents(items: str | Extent | Sequence[Extent | str]) -> list[Extent]:
    # a string is one or more extents, as on the command line, never a
    # sequence of characters
    if isinstance(items, str):
        return parse_extents(items)
    if isinstance(items, Extent):
        return [items]
    return [e for item in items for e in _extents(item)]


@contextlib.contextmanager
def mount(lower: str | os.PathLike[str], mountpoint: str | os.PathLike[str],
          idmap: IdMap | None = None, *,
          uidmap: str | Sequence[Extent | str] = (), gidmap: str | Sequence[Extent | str] = (),
          options: Sequence[str] = (), timeout: float = 20.0) -> Iterator[str]:
    """Mount ``lower`` shifted at ``mountpoint`` for the duration of a ``with``
    block: run ``shiftfs -f`` in a child process, wait until the mount is
    live, yield the mount point (a str), and always unmount and reap the
    child, also when the body raises.

    The table is an :class:`~shiftfs.idmap.IdMap` (``build_idmap(...)``, the
    object the command line builds) or ``uidmap``/``gidmap``: a string of
    one or more ``LOWER:UPPER:COUNT`` extents as on the command line
    (``"0:100000:65536"``, ``"0:100000:1000 1000:1000:1"``), or a sequence
    of such strings or :class:`~shiftfs.idmap.Extent`; a missing side copies
    the other. ``options`` are further command-line
    words, e.g. ``["-o", "ro"]`` or ``["--userns", "1234"]``.

    Raises :class:`~shiftfs.idmap.TableError` (a ValueError) for a bad table
    before anything is started, :class:`MountError` when ``mountpoint`` is
    already a mount point or the child exits without mounting (its message
    is the child's error), and TimeoutError
    when the mount is not live within ``timeout`` seconds.

    >>> with mount("/srv/rootfs", "/mnt/c1", uidmap=["0:100000:65536"]) as mp:
    ...     os.stat(mp).st_uid
    100000
    """
    if idmap is not None:
        uids, gids = idmap.uids.extents, idmap.gids.extents
    else:
        uids, gids = _extents(uidmap), _extents(gidmap)
        if uids or gids:
            checked = build_idmap(uids, gids)  # refuse a bad table here, not in the child
            uids, gids = checked.uids.extents, checked.gids.extents
    lower, mountpoint = os.fspath(lower), os.fspath(mountpoint)
    if is_mounted(mountpoint, None):  # else its presence would read as "live"
        raise MountError(f"{mountpoint} is already a mount point")
    cmd = ([sys.executable, "-m", "shiftfs", "-f", "-q", lower, mountpoint]
           + extent_args("--uidmap", uids) + extent_args("--gidmap", gids) + list(options))
    # stderr to a file, not a pipe: a chatty child (-d) must never block on it
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=errlog)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                errlog.seek(0)
                err = errlog.read().decode(errors="replace").strip()
                raise MountError(f"shiftfs exited with status {proc.returncode} "
                                 f"without mounting {mountpoint}: {err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"shiftfs did not mount {mountpoint} within {timeout}s")
            time.sleep(0.01)
        yield mountpoint
    finally:
        try:
            _stop(proc, mountpoint)
        finally:
            errlog.close()


def _stop(proc: subprocess.Popen, mountpoint: str) -> None:
    if is_mounted(mountpoint):
        try:
            unmount(mountpoint)
        except OSError:
            # busy: detach now; the daemon serves the open files until they
            # are released, then the kernel ends the connection and it exits
            unmount(mountpoint, lazy=True)
            threading.Thread(target=proc.wait, daemon=True).start()
            return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

"""Running a mount: ``serve`` makes it and becomes its supervisor
(supervisor.py), ``resume`` takes it over after an upgrade, and
``_server`` is each server the supervisor forks (session.py + ops.py).

serve, in stages:
1. check: logging, fd limit, set-id fixup bits, the mount point held as an
   fd (a root daemon mounts on what it checked, never a path resolved again);
2. open the device: /dev/fuse ourselves (root: the new mount API), or
   through fusermount3 (libfuse.py) where we cannot mount;
3. fork the server, which answers INIT;
4. mount: the FUSE filesystem made with fsopen/fsmount and the lower's root
   below its root bind-mounted on the mount point (``_mount_below``);
5. wait for the server's READY (INIT answered);
6. serve: the supervisor's loop, which restarts dead servers and unmounts
   at SIGTERM, SIGINT or SIGHUP.
The INIT choices are the session's (session.py, what the daemon asks for);
what was granted is kept in the journal's header for the next server.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import logging.handlers
import os
import resource
import signal
import sys
from dataclasses import dataclass, field

from . import cache, libfuse, linux
from .idmap import IdMap, build_idmap, parse_extents
from .mount import FSTYPE, mount_point_of, mountinfo, unmount
from .ops import ROOT_NAME, Operations
from .session import MAX_WRITE, Session
from .supervisor import FdStore, Held, NodeJournal, Supervisor, status_path
from .watch import Shrinker, Watcher

log = logging.getLogger("shiftfs")
WORKERS = 3  # pool threads for requests that may block (session.py); the reader serves the rest
READ_AHEAD_KB = 1024  # sequential reads in 1 MiB requests (the kernel default is 128 KiB)
# lowers whose calls may block for long (network, another FUSE daemon):
# every request there goes to the session's pool
_SLOW_LOWERS = ("fuse", "nfs", "cifs", "smb3", "9p", "ceph", "glusterfs", "sshfs")


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
    passthrough: str = "auto"  # auto (where kernel and privilege allow) | off
    threads: bool = True

    def mount_options(self, lower: str) -> list[str]:
        """The -o words for fusermount3 and the kernel."""
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

    def cache_plan(self) -> cache.Plan:
        return cache.Plan(self.cache, cache.Lifetimes(self.attr_timeout, self.entry_timeout,
                                                      self.negative_timeout), self.timeouts_given)


def setup_logging(foreground: bool) -> None:
    """Where the daemon's own messages go: stderr in the foreground, syslog
    (the journal) once daemonized, which points stderr at /dev/null.
    SHIFTFS_SYSLOG names another syslog socket (tests)."""
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
            pass  # no syslog here: stderr until the daemon closes it
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the read-ahead of the FUSE mount at ``mountpoint`` (its bdi,
    /sys/class/bdi/MAJOR:MINOR), without touching the mount itself. Root
    only; False if it could not be done."""
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
            _stdio_to_null()
    return report


def _stdio_to_null() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


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


def handles_killpriv_v2() -> bool:
    """Whether a mount made now by this process clears set-id bits itself
    (FUSE_HANDLE_KILLPRIV_V2, offered by Linux 5.11+, negotiated by our own
    INIT reply): as root, where the daemon may clear them on any file."""
    return os.geteuid() == 0


# ---- 1. check -------------------------------------------------------------------

def _prepare(options: MountOptions) -> None:
    setup_logging(options.foreground)
    linux.limit_mmap_threshold()
    _raise_nofile()
    if os.geteuid() == 0 and not linux.keep_caps_across_fsuid():
        print("shiftfs: cannot set SECBIT_NO_SETUID_FIXUP; new files may get the wrong owner",
              file=sys.stderr)


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


# ---- 2. open the device -----------------------------------------------------------

@dataclass
class _Device:
    fd: int
    sync_init: bool  # INIT answered before mount(2) returns (FUSE_DEV_IOC_SYNC_INIT, 6.18+)
    fusermount: libfuse.FusermountMount | None = None  # who mounted, where not us


def _open_device(own: bool, mp: str, lower: str, options: MountOptions) -> _Device:
    """/dev/fuse opened for a mount we make ourselves, or the fd
    fusermount3 hands back after mounting (through libfuse)."""
    if not own:
        fusermount = libfuse.FusermountMount(mp, options.mount_options(lower))
        return _Device(fusermount.fd, False, fusermount)
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open /dev/fuse: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, linux.FUSE_DEV_IOC_SYNC_INIT)
    except OSError:  # ENOTTY: INIT is answered after mount(2) returns
        return _Device(fd, False)
    return _Device(fd, True)


# ---- 4. mount ---------------------------------------------------------------------

def _fuse_words(fd: int, lower: str, options: MountOptions) -> list[str]:
    # the source and fstype say fsname= and subtype=
    return [f"fd={fd}", f"user_id={os.geteuid()}", f"group_id={os.getegid()}"] + [
        w for w in options.mount_options(lower) if not w.startswith(("fsname=", "subtype="))]


def _mount_below(fd: int, lower: str, mp_fd: int, options: MountOptions) -> int:
    """A FUSE filesystem served on ``fd`` made with fsopen/fsmount, and its
    directory ops.ROOT_NAME (the lower's root) bind-mounted on the directory
    ``mp_fd`` holds; the FUSE root itself is never attached. See
    ops.ROOT_NAME for why. Returns the new mount's id."""
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


def _unmount_own(mnt_id: int) -> None:
    """Detach our own mount, wherever it is now (a parent may have been
    renamed), and nothing else: its current path is opened without
    following symlinks and unmounted through the fd only if that fd is on
    our mount (not on one stacked over it)."""
    mp = mount_point_of(mnt_id)
    if mp is None:
        return  # unmounted already
    fd = _open_mount_point(mp)
    try:
        if linux.mount_id(fd) == mnt_id:
            linux.umount2(f"/proc/self/fd/{fd}", linux.MNT_DETACH)
    finally:
        os.close(fd)


def _attach(device: _Device, lower: str, mp_fd: int | None, options: MountOptions,
            resume: dict):
    """The mount made (where fusermount3 has not made it already); returns
    how to end it."""
    if device.fusermount is not None:
        return device.fusermount.unmount
    try:
        mnt_id = _mount_below(device.fd, lower, mp_fd, options)
    finally:
        os.close(mp_fd)
    resume["mnt_id"] = mnt_id
    return lambda: _unmount_own(mnt_id)


# ---- serve: the stages in order ------------------------------------------------------

def serve(lower: str, mountpoint: str, idmap: IdMap, options: MountOptions) -> int:
    """Mount and serve until unmounted. Without ``foreground`` the process
    forks once the mount is live, so the caller returns only then. The
    process that returns is the mount's supervisor (supervisor.py): it
    holds /dev/fuse and the mount, and forks the server that does the
    work, again whenever one dies."""
    _prepare(options)
    own = mounts_itself()
    mp = os.path.realpath(mountpoint)
    status = status_path(mp)  # now: once mounted, a stat of the mount point waits for INIT
    try:
        mp_fd = _open_mount_point(mp) if own else None
    except OSError as e:
        print(f"shiftfs: mount point {mountpoint}: {e.strerror or e}", file=sys.stderr)
        return 1
    report = None if options.foreground else _daemonize()

    def fail(e: BaseException) -> int:
        what = (e.strerror or str(e)) if isinstance(e, OSError) else repr(e)
        print(f"shiftfs: mount of {mountpoint} failed: {what}", file=sys.stderr)
        if report:
            report(False)
        return 1

    try:
        device = _open_device(own, mp, lower, options)
    except OSError as e:
        if mp_fd is not None:
            os.close(mp_fd)
        return fail(e)
    resume = {"lower": lower, "mountpoint": mountpoint, "own": own, "mountpoint_real": mp,
              "uidmap": [str(e) for e in idmap.uids.extents],
              "gidmap": [str(e) for e in idmap.gids.extents],
              "options": dataclasses.asdict(options), "mnt_id": None}
    sup = Supervisor(device.fd, mp, _server_starter(lower, idmap, options, device.fd, own), lambda: None, resume,
                     status=status)
    sup.fork_server(restored=False)  # it answers INIT (and the lookup of the root below)
    try:
        sup.unmount = _attach(device, lower, mp_fd, options, resume)
    except OSError as e:
        _end_server(sup)
        return fail(e)
    try:
        if not sup.wait_ready(20):
            raise OSError(errno.EIO, "the server did not answer INIT")
    except BaseException as e:  # noqa: B902 (never a mount left without its server)
        sup.unmount()
        _end_server(sup)
        sup.remove_status()
        return fail(e)
    _announce(sup, lower, mountpoint, device, options)
    if report:
        report(True)
    return sup.run()


def _announce(sup: Supervisor, lower: str, mountpoint: str, device: _Device,
              options: MountOptions) -> None:
    set_read_ahead(sup.mountpoint, READ_AHEAD_KB)
    log.info("serving %s at %s%s", lower, mountpoint, " (file data passed through)"
             if sup.journal.granted(MAX_WRITE).passthrough else "")
    if options.debug:
        log.info("INIT was %s", "synchronous (FUSE_DEV_IOC_SYNC_INIT)" if device.sync_init
                 else "asynchronous (no FUSE_DEV_IOC_SYNC_INIT here)")
        log.info("the mount shows %s", "the FUSE root"
                 if device.fusermount else "the FUSE root's directory 'root' (ACLs of the root cached)")


def resume(fd: int) -> int:
    """``shiftfs --resume FD``: a supervisor re-executed by an upgrade
    takes over the mount from the state its predecessor left in ``fd``."""
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
    sup = Supervisor(device_fd, mp, _server_starter(lower, idmap, options, device_fd, own), end, state,
                     journal=NodeJournal(state["journal_fd"]), held=held,
                     restarts=state["restarts"], status=state["status"])
    sup.fork_server(restored=True)
    log.warning("upgraded: server %d serves %s", sup.server_pid, mountpoint)
    return sup.run()


def _end_server(sup: Supervisor) -> None:
    try:
        os.kill(sup.server_pid, signal.SIGKILL)
        os.waitpid(sup.server_pid, 0)
    except OSError:
        pass


# ---- a server -------------------------------------------------------------------------

def _server_starter(lower, idmap, options, device_fd, own):
    def start(journal, sock, held, restored) -> int:
        return _server(_Serving(lower, idmap, options, device_fd, own), journal, sock, held,
                       restored)
    return start


@dataclass
class _Serving:
    lower: str
    idmap: IdMap
    options: MountOptions
    device_fd: int
    own: bool


def _server(s: _Serving, journal: NodeJournal, sock, held: dict[int, Held],
            restored: bool) -> int:
    """A server (in a child of the supervisor): serve the mount until it
    ends (exit 0) or this process dies (the supervisor starts another).
    ``restored``: take over from a dead server, whose nodes ``journal``
    names and whose open files ``held`` are (at their fh numbers)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if not s.options.foreground:  # a daemon's server speaks to syslog only (setup_logging)
        _stdio_to_null()
    operations = Operations(s.lower, s.idmap, s.options.cache_plan(), s.own)
    table = operations.table
    granted = journal.granted(MAX_WRITE) if restored else None
    if restored:
        table.restore(journal, held)
        for fh, h in held.items():
            if h.flags & os.O_DIRECTORY:
                operations.resume_dir(fh)
    else:
        _log_lacks(operations, s.lower)
        journal.fit(table.root.handle)
        table.journal = journal
    store = FdStore(sock)
    table.store = store
    signal.signal(signal.SIGUSR1, lambda *_: store.flushed())  # before an upgrade ends us
    root = os.geteuid() == 0
    session = Session(operations, s.device_fd,
                      passthrough=s.options.passthrough != "off" and root, killpriv_v2=root,
                      max_readahead=READ_AHEAD_KB * 1024, debug=s.options.debug,
                      slow=operations.lower_type.startswith(_SLOW_LOWERS),
                      pool_threads=WORKERS if s.options.threads else 1, granted=granted)
    try:
        watcher = _watcher(table, s.lower, s.options)
    except OSError as e:
        log.error("%s", e.strerror)
        return 2
    started = _take_over(session, watcher, granted) if restored else \
        _first_init(session, journal, s.options)
    if not started:
        return 2
    store.ready()
    if watcher is not None and not restored:
        watcher.start(session)
    # the table's fds stay well inside RLIMIT_NOFILE (open files need some too)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    table.high, table.low = int(limit * 0.6), int(limit * 0.4)
    Shrinker(table, session).start()
    session.wait(None, signals=False)
    return 0 if session.unmounted else 1


def _log_lacks(operations: Operations, lower: str) -> None:
    lacks = operations.lacks()
    if lacks:
        log.warning("the lower %s (%s) lacks %s", lower, operations.lower_type or "?",
                    "; ".join(lacks))


def _watcher(table, lower: str, options: MountOptions) -> Watcher | None:
    """-o cache=auto|watch: a Watcher (fanotify inode marks on what the
    kernel holds, root or not), which tells the table of itself; the cache
    policy (cache.py) settles on it at INIT. cache=watch refuses to mount
    without one; cache=timeout|forever watch nothing."""
    if not options.cache_plan().wants_watcher():
        return None
    try:
        return Watcher(table)
    except OSError as e:
        if options.cache == "watch":
            raise OSError(e.errno, f"-o cache=watch: no fanotify on {lower}: {e.strerror}") from None
        log.warning("changes behind the mount show within %g s (no fanotify on %s: %s)",
                    options.attr_timeout, lower, e.strerror or e)
        return None


def _first_init(session: Session, journal: NodeJournal, options: MountOptions) -> bool:
    session.start()
    if not session.inited.wait(30) or session.init_error is not None:
        log.error("no INIT from the kernel: %s", session.init_error)
        return False
    journal.set_granted(session.granted)
    if options.debug:
        log.info("set-id bits on write and truncate cleared by %s",
                 "the daemon (FUSE_HANDLE_KILLPRIV_V2)" if session.granted.killpriv_v2
                 else "the kernel")
    return True


def _take_over(session: Session, watcher: Watcher | None, granted) -> bool:
    """A new server after a dead one: the directories the kernel holds
    marked again, the requests the dead one had read resent, and what
    changed while no server watched expired. In that order: an expiry
    waits for the lock of its directory (or page), which a resent request
    may hold until it is answered."""
    if watcher is not None:
        _watch_restored(session.fs.table, watcher)
    session.start()
    if watcher is not None:
        watcher.start(session)
    if granted.resend and session.resend() == 0:
        log.info("server %d took over: requests the dead one had read are resent", os.getpid())
    else:
        log.warning("server %d took over; this kernel cannot resend the requests the dead "
                    "one had read (Linux 6.9+): their callers wait until killed", os.getpid())
    if watcher is not None:
        watcher.expire_all("what changed while no server watched", listing=True)
    return True


def _watch_restored(table, watcher: Watcher) -> None:
    """A new server's watcher marks the directories (and linked files) the
    kernel still holds, as the dead server's did: each reopened by handle."""
    for node in table.nodes():
        if not (node.is_dir() or node.opens):
            continue
        try:
            if node.fd < 0:
                table.reopen(node)
            watcher.added(node, os.fstat(node.fd))
        except OSError:
            continue  # gone: it answers ESTALE when named

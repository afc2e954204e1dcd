"""Kernel idmapped bind mounts, the oracle shiftfs is held against.

Made with open_tree(2) + mount_setattr(2) MOUNT_ATTR_IDMAP + move_mount(2)
through ctypes: util-linux 2.38's X-mount.idmap is silently ignored on
Debian 12, so no external tool is trusted here.

Extents are (lower, upper, count): on-disk id `lower` is seen as `upper`
through the mount. The kernel reads a mount idmap exactly like a uid_map line
(inside, outside, count) with inside = on-disk, so extents are written to the
helper namespace's uid_map/gid_map unchanged.
"""
import contextlib
import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscalls added after the 5.1 table unification share one number on every
# architecture (x86_64, aarch64, arm, i386, riscv, ...) except these offsets.
_NR_OFFSET = {"alpha": 110, "ia64": 1024}.get(platform.machine(), 0)
NR_OPEN_TREE, NR_MOVE_MOUNT, NR_MOUNT_SETATTR = (n + _NR_OFFSET for n in (428, 429, 442))

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _syscall(nr, *args):
    # syscall() is variadic: pass every integer as a full long.
    return _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def map_text(extents):
    """uid_map/gid_map text for extents (lower, upper, count); refuses an empty map."""
    extents = [tuple(int(x) for x in e) for e in extents]
    if not extents:
        raise ValueError("an id map needs at least one extent (lower, upper, count)")
    for lower, upper, count in extents:
        if lower < 0 or upper < 0 or count <= 0:
            raise ValueError(f"bad extent (lower={lower}, upper={upper}, count={count})")
    return "".join(f"{lower} {upper} {count}\n" for lower, upper, count in extents)


def write_id_maps(pid, uid_extents, gid_extents):
    """Write /proc/PID/{uid,gid}_map; each must go in one write()."""
    for name, extents in (("uid_map", uid_extents), ("gid_map", gid_extents)):
        text = map_text(extents)
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, f"writing {name} {text.strip()!r} for pid {pid}: {e.strerror}"
                          " (extents must not overlap on either side)") from None


def make_userns(uid_extents, gid_extents):
    """Return an O_RDONLY fd of a new user namespace with the given maps.

    A forked child unshares and parks until the parent has written the maps
    and opened its ns/user; the fd keeps the namespace alive after the child
    exits.
    """
    map_text(uid_extents), map_text(gid_extents)  # refuse bad maps before forking
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            err = 0 if _libc.unshare(CLONE_NEWUSER) == 0 else ctypes.get_errno()
            os.write(ready_w, str(err).encode())
            os.read(go_r, 1)  # EOF when the parent is done with us
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        reply = os.read(ready_r, 16)
        if not reply:
            raise OSError(f"userns helper child {pid} died before unshare")
        if int(reply):
            raise OSError(int(reply), f"unshare(CLONE_NEWUSER): {os.strerror(int(reply))}")
        write_id_maps(pid, uid_extents, gid_extents)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def fs_type(path):
    """Filesystem type of the mount holding path, from /proc/self/mountinfo (for error messages)."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                return fields[fields.index("-") + 1]
    return "unknown"


def _umount(target):
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    # Busy (a test left a file open or a cwd inside): detach rather than leave it.
    if _libc.umount2(path, MNT_DETACH) != 0:
        raise OSError(err, f"umount {target}: {os.strerror(err)}; "
                           f"MNT_DETACH: {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def idmapped_mount(source: str, target: str, uid_extents, gid_extents):
    """Bind-mount `source` at `target` (an existing empty dir) with an idmap in which each
    extent (lower, upper, count) shows on-disk id `lower` as `upper`. Unmounts on exit (MNT_DETACH as last resort).

    Ids with no extent show as the overflow id (65534); callers whose fsuid or
    fsgid has no extent cannot create files there (EOVERFLOW). Only the top
    mount of `source` is idmapped; submounts are cloned unmapped.
    """
    userns_fd = make_userns(uid_extents, gid_extents)
    try:
        tree_fd = _check(_syscall(NR_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                                  OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
                         f"open_tree({source!r})")
        try:
            attr = MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
            if _syscall(NR_MOUNT_SETATTR, tree_fd, b"", AT_EMPTY_PATH,
                        ctypes.byref(attr), ctypes.sizeof(attr)) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount_setattr(MOUNT_ATTR_IDMAP) on {source!r}: {os.strerror(err)}; "
                                   f"its filesystem ({fs_type(source)}) probably does not support idmapped mounts")
            _check(_syscall(NR_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, os.fsencode(target),
                            MOVE_MOUNT_F_EMPTY_PATH), f"move_mount(-> {target!r})")
        finally:
            os.close(tree_fd)  # a clone that was never moved is dropped with its fd
    finally:
        os.close(userns_fd)
    try:
        yield target
    finally:
        _umount(target)

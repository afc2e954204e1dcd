"""The differential harness: one operation, one caller, two mounts of the
same lower tree with the same table -- shiftfs and a kernel idmapped bind
mount -- and a readable row for every way the two disagree.

A *case* is (operation, caller). For each case a fresh subdirectory holding
the same small tree is built directly in both lower trees (as host root,
never through a mount), the operation runs as the caller in a forked child
on each mount, and then three things are compared:

- the operation's return value or errno;
- what the mount shows afterwards for every entry (type, uid, gid, mode, and
  the id-carrying xattrs as read through the mount);
- what the lower tree holds afterwards (type, uid, gid, mode, size or link
  target, whether the mtime moved, every xattr with ACLs decoded).

Expected values are the kernel's: nothing here knows what shiftfs "should"
do. One mount pair serves every case of a test module; cases only ever
touch their own subdirectory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from tests.callers import Errno, call_as, call_as_userns_root
from tests.oracle.kernel_idmap import idmapped_mount

from shiftfs.idmap import Extent
from shiftfs.mount import is_mounted, mount, unmount

# ---- the table --------------------------------------------------------------
# Lower 0..1999 seen as 100000..101999 for both uids and gids. Host root
# (upper 0) is not in the table; lower 5000 (and 2000, 65534, ...) is.
BASE = 100000
COUNT = 2000
UID_EXTENTS = [(0, BASE, COUNT)]
GID_EXTENTS = [(0, BASE, COUNT)]
UNMAPPED_LOWER = 5000
UNMAPPED_UPPER = 4242
OVERFLOW_UID = int(open("/proc/sys/kernel/overflowuid").read())
OVERFLOW_GID = int(open("/proc/sys/kernel/overflowgid").read())
FIXED_TIME = 1_000_000_000  # every built entry's atime/mtime, so "did it move" is comparable


def U(lower_id: int) -> int:
    """The upper id of a mapped lower id."""
    assert 0 <= lower_id < COUNT
    return BASE + lower_id


class Up:
    """A mapped id named by its lower value, resolved when the operation runs
    to what the caller calls it: the upper id for callers in the initial user
    namespace, the lower id itself for "container root", whose namespace maps
    exactly like the table."""

    def __init__(self, lower_id: int):
        self.lower = lower_id

    def __repr__(self):
        return f"Up({self.lower})"


def in_container() -> bool:
    with open("/proc/self/uid_map") as f:
        return f.read().split() != ["0", "0", "4294967295"]


def v(x):
    """Resolve an operation argument in the caller's process: Up ids and
    callables (values built from Up ids) become what the caller writes."""
    if isinstance(x, Up):
        return x.lower if in_container() else U(x.lower)
    if callable(x):
        return x()
    return x


# ---- xattr values -------------------------------------------------------------
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
CAPS = "security.capability"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF
_TAG_NAMES = {USER_OBJ: "user::", USER: "user:", GROUP_OBJ: "group::", GROUP: "group:",
              MASK: "mask::", OTHER: "other::"}


def acl(*entries) -> bytes:
    """Raw ACL xattr from (tag, perm, id) entries (id ignored for id-less tags)."""
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, NO_ID if tag not in (USER, GROUP) else ident)
        for tag, perm, ident in entries)


def acl_text(value: bytes) -> str:
    if len(value) < 4 or (len(value) - 4) % 8:
        return f"<bad ACL {value.hex()}>"
    out = []
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        who = str(ident) if tag in (USER, GROUP) else ""
        out.append(f"{_TAG_NAMES.get(tag, hex(tag))}{who}:{perm:o}")
    return ",".join(out)


REV2, REV3 = 0x02000000, 0x03000000
CAP_NET_RAW = 1 << 13
EFFECTIVE = 1


def cap_v2(permitted=CAP_NET_RAW, flags=EFFECTIVE) -> bytes:
    return struct.pack("<IIIII", REV2 | flags, permitted, 0, 0, 0)


def cap_v3(root: int, permitted=CAP_NET_RAW, flags=EFFECTIVE) -> bytes:
    return struct.pack("<IIIIII", REV3 | flags, permitted, 0, 0, 0, root)


def cap_text(value: bytes) -> str:
    if len(value) == 20:
        magic, p0, i0, p1, i1 = struct.unpack("<IIIII", value)
        return f"v{magic >> 24} flags={magic & 0xFFFFFF:#x} p={p0:#x}/{p1:#x} i={i0:#x}/{i1:#x}"
    if len(value) == 24:
        magic, p0, i0, p1, i1, root = struct.unpack("<IIIIII", value)
        return (f"v{magic >> 24} flags={magic & 0xFFFFFF:#x} p={p0:#x}/{p1:#x} i={i0:#x}/{i1:#x}"
                f" root={root}")
    return f"<{len(value)} bytes {value.hex()}>"


def xattr_text(name: str, value: bytes) -> str:
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return acl_text(value)
    if name == CAPS:
        return cap_text(value)
    return repr(value)


# ---- the tree every case starts from -----------------------------------------
@dataclass
class Entry:
    path: str
    kind: str           # "dir", "file", "symlink", "fifo"
    mode: int
    uid: int            # lower ids
    gid: int
    data: bytes = b"hello\n"
    target: str = ""
    xattrs: dict = field(default_factory=dict)


def E(path, kind, mode, uid, gid=None, **kw) -> Entry:
    return Entry(path, kind, mode, uid, uid if gid is None else gid, **kw)


Z = UNMAPPED_LOWER
TREE = [
    E("pub", "dir", 0o777, 0),
    E("pub/f", "file", 0o644, 1000),                 # the "user" caller's file
    E("pub/g", "file", 0o666, 1001),                 # the "member" caller's, world-writable
    E("pub/og", "file", 0o644, 1000, 1700),          # user's file, group the user is not in
    E("pub/mg", "file", 0o644, 1001, 1500),          # member's file, its supplementary group
    E("pub/suid", "file", 0o6755, 1000),             # set-uid + set-gid with group exec
    E("pub/sgid_nx", "file", 0o2644, 1000),          # set-gid without group exec
    E("pub/sw", "file", 0o6777, 1001),               # world-writable set-id file
    E("pub/sgw", "file", 0o2666, 1001),              # world-writable set-gid, no group exec
    E("pub/root", "file", 0o644, 0),
    E("pub/fz", "file", 0o666, Z),                   # frozen: uid and gid unmapped
    E("pub/fzu", "file", 0o666, Z, 1000),            # frozen: uid unmapped
    E("pub/fzg", "file", 0o666, 1000, Z),            # frozen: gid unmapped
    E("pub/fzs", "file", 0o6777, Z),                 # frozen set-id file
    E("pub/fzd", "dir", 0o777, Z),                   # frozen directory...
    E("pub/fzd/c", "file", 0o666, 1000),             # ...with a mapped child
    E("pub/fze", "dir", 0o777, Z),                   # frozen empty directory
    E("pub/e1999", "file", 0o644, 1999),             # last mapped id
    E("pub/e2000", "file", 0o644, 2000),             # first unmapped id
    E("pub/e65534", "file", 0o644, 65534),
    E("pub/e65535", "file", 0o644, 65535),
    E("pub/emax", "file", 0o644, 0xFFFFFFFE),
    E("pub/ln", "symlink", 0o777, 1000, target="f"),
    E("pub/fifo", "fifo", 0o666, 1000),
    E("pub/cap2", "file", 0o755, 1000, xattrs={CAPS: cap_v2()}),
    E("pub/cap3_0", "file", 0o755, 1000, xattrs={CAPS: cap_v3(0)}),
    E("pub/cap3_1000", "file", 0o755, 1000, xattrs={CAPS: cap_v3(1000)}),
    E("pub/cap3_z", "file", 0o755, 1000, xattrs={CAPS: cap_v3(Z)}),
    E("pub/acl", "file", 0o660, 1000, xattrs={ACL_ACCESS: acl(
        (USER_OBJ, 6, 0), (USER, 6, 1001), (USER, 4, Z), (GROUP_OBJ, 4, 0),
        (GROUP, 4, 1500), (MASK, 6, 0), (OTHER, 0, 0))}),
    E("pub/dacl", "dir", 0o777, 1000, xattrs={ACL_DEFAULT: acl(
        (USER_OBJ, 7, 0), (USER, 7, 1001), (GROUP_OBJ, 5, 0), (GROUP, 5, 1500),
        (MASK, 7, 0), (OTHER, 5, 0))}),
    E("pub/fzacl", "file", 0o666, Z, xattrs={ACL_ACCESS: acl(
        (USER_OBJ, 6, 0), (USER, 6, 1001), (GROUP_OBJ, 6, 0), (MASK, 6, 0), (OTHER, 6, 0))}),
    E("pub/x", "file", 0o644, 1000, xattrs={"user.x": b"1"}),
    # frozen inodes that deny someone: capabilities do not override on them
    E("pub/fzr", "file", 0o600, Z, xattrs={"user.x": b"1"}),  # readable by no one
    E("pub/fzgr", "file", 0o640, Z, 1500, xattrs={"user.x": b"1"}),  # by group 1500 only
    E("pub/fzgo", "file", 0o604, Z, 1500),           # by all but group 1500
    E("pub/fzacl2", "file", 0o640, Z, xattrs={ACL_ACCESS: acl(
        (USER_OBJ, 6, 0), (USER, 4, 1001), (GROUP_OBJ, 0, 0), (MASK, 4, 0), (OTHER, 0, 0))}),
    E("pub/fzl", "symlink", 0o777, Z, target="f"),   # frozen symlink
    E("pub/fzd7", "dir", 0o700, Z),                  # frozen directories: no search ...
    E("pub/fzd7/c", "file", 0o644, 1000),
    E("pub/fzd7/l", "symlink", 0o777, 1000, target="c"),
    E("pub/fzd71", "dir", 0o711, Z),                 # ... search only ...
    E("pub/fzd71/c", "file", 0o644, 1000),
    E("pub/fzd71/l", "symlink", 0o777, 1000, target="c"),
    E("pub/fzd75", "dir", 0o755, Z),                 # ... list and search ...
    E("pub/fzd75/c", "file", 0o644, 1000),
    E("pub/fzd75/l", "symlink", 0o777, 1000, target="c"),
    E("pub/fzdg", "dir", 0o750, Z, 1500),            # ... by group 1500 only
    E("pub/fzdg/c", "file", 0o644, 1000),
    E("sticky", "dir", 0o1777, 0),
    E("sticky/own", "file", 0o644, 1000),            # user's file in a sticky dir
    E("sticky/other", "file", 0o666, 1001),          # member's file in a sticky dir
    E("sticky/fz", "file", 0o666, Z),
    E("sgid", "dir", 0o2777, 0, 1500),               # set-gid directory, group 1500
    E("priv", "dir", 0o755, 1000),                   # only the user may write here
    E("priv/f", "file", 0o644, 1000),
]


def build_tree(base: str, extra: Callable[[str], None] | None = None) -> None:
    """The tree, made directly in a lower directory as host root."""
    os.mkdir(base, 0o755)
    dirs = []
    for e in TREE:
        p = os.path.join(base, e.path)
        if e.kind == "dir":
            os.mkdir(p)
            dirs.append(e)
        elif e.kind == "file":
            with open(p, "wb") as f:
                f.write(e.data)
        elif e.kind == "fifo":
            os.mkfifo(p)
        elif e.kind == "symlink":
            os.symlink(e.target, p)
        os.chown(p, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(p, e.mode)  # after chown, which clears set-id bits
        for name, value in e.xattrs.items():  # after chown, which drops capabilities
            os.setxattr(p, name, value, follow_symlinks=False)
    if extra is not None:
        extra(base)
    for dirpath, dirnames, filenames in os.walk(base, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
        os.utime(dirpath, (FIXED_TIME, FIXED_TIME))


# ---- snapshots ------------------------------------------------------------------
_KINDS = ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
          (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
          (stat.S_ISSOCK, "sock"))


def kind_of(mode: int) -> str:
    return next(name for test, name in _KINDS if test(mode))


def rel_paths(base: str) -> list[str]:
    out = ["."]
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            out.append(os.path.relpath(os.path.join(dirpath, name), base))
    return out


def lower_snapshot(base: str) -> dict:
    snap = {}
    for rel in rel_paths(base):
        p = os.path.join(base, rel)
        st = os.lstat(p)
        kind = kind_of(st.st_mode)
        row = {"type": kind, "uid": st.st_uid, "gid": st.st_gid,
               "mode": oct(stat.S_IMODE(st.st_mode)),
               "mtime_moved": st.st_mtime_ns != FIXED_TIME * 10**9 if kind != "dir" else None}
        if kind == "file":
            with open(p, "rb") as f:
                row["data"] = f.read(64)
        elif kind == "symlink":
            row["target"] = os.readlink(p)
        elif kind in ("chr", "blk"):
            row["rdev"] = st.st_rdev
        for name in sorted(os.listxattr(p, follow_symlinks=False)):
            row["xattr " + name] = xattr_text(name, os.getxattr(p, name, follow_symlinks=False))
        snap[rel] = row
    return snap


def _upper_xattr(p: str, name: str):
    try:
        return xattr_text(name, os.getxattr(p, name, follow_symlinks=False))
    except OSError as e:
        return Errno(e.errno)


def upper_snapshot(mnt_base: str, rels: list[str]) -> dict:
    """What host root sees through the mount for each lower entry."""
    snap = {}
    for rel in rels:
        p = os.path.join(mnt_base, rel)
        try:
            st = os.lstat(p)
        except OSError as e:
            snap[rel] = Errno(e.errno)
            continue
        kind = kind_of(st.st_mode)
        row = {"type": kind, "uid": st.st_uid, "gid": st.st_gid,
               "mode": oct(stat.S_IMODE(st.st_mode))}
        if kind != "symlink":
            row[ACL_ACCESS] = _upper_xattr(p, ACL_ACCESS)
            if kind == "dir":
                row[ACL_DEFAULT] = _upper_xattr(p, ACL_DEFAULT)
            if kind == "file":
                row[CAPS] = _upper_xattr(p, CAPS)
        snap[rel] = row
    return snap


# Documented differences (docs/semantics.md, Differences from kernel idmapped mounts), as rewrites of the kernel's
# value into what shiftfs shows instead. A row that only differs by one of
# these is not a failure; it is counted under the difference's name.
def _acl_unmapped_id(value):
    """D1: an ACL entry whose lower id is unmapped reads back through the
    kernel mount as 4294967295 (and matches no caller); the FUSE client
    refuses an ACL holding that id, so shiftfs leaves the entry out of what
    it shows (and so it grants nothing either)."""
    if isinstance(value, str) and ":4294967295:" in value:
        return ",".join(e for e in value.split(",") if ":4294967295:" not in e)
    if isinstance(value, (list, tuple)):
        return type(value)(_acl_unmapped_id(v) for v in value)
    return value


DOCUMENTED = {"D1 ACL entry with an unmapped id": _acl_unmapped_id}


def classify(mine, kernels) -> str | None:
    """None if equal, the documented difference's name if it explains the
    difference, else "" (an undocumented difference)."""
    if mine == kernels:
        return None
    for name, rewrite in DOCUMENTED.items():
        if rewrite(kernels) == mine:
            return name
    return ""


def diff_rows(where: str, a: dict, b: dict, documented: list | None = None) -> list[str]:
    rows = []

    def check(label, va, vb):
        kind = classify(va, vb)
        if kind == "":
            rows.append(f"{label}: shiftfs={va!r} kernel={vb!r}")
        elif kind is not None and documented is not None:
            documented.append(f"{kind}: {label}")

    for rel in sorted(set(a) | set(b)):
        ra, rb = a.get(rel, "<absent>"), b.get(rel, "<absent>")
        if ra == rb:
            continue
        if isinstance(ra, dict) and isinstance(rb, dict):
            for key in sorted(set(ra) | set(rb)):
                check(f"{where} {rel} {key}", ra.get(key, "<absent>"), rb.get(key, "<absent>"))
        else:
            check(f"{where} {rel}", ra, rb)
    return rows


# ---- callers --------------------------------------------------------------------
UMASK = 0o022


@dataclass(frozen=True)
class Caller:
    name: str
    uid: int = 0
    gid: int = 0
    groups: tuple = ()
    userns: bool = False  # "container root": uid 0 in a namespace mapped like the table

    def run(self, fn, *args):
        if self.userns:
            # inside id = the table's lower id, outside = its upper id
            return call_as_userns_root(fn, *args, uid_extents=UID_EXTENTS,
                                       gid_extents=GID_EXTENTS, umask=UMASK)
        return call_as(fn, *args, uid=self.uid, gid=self.gid, groups=self.groups, umask=UMASK)


CALLERS = [
    Caller("host_root", 0, 0),
    Caller("user", U(1000), U(1000)),
    Caller("member", U(1001), U(1001), (U(1500),)),
    Caller("unmapped", UNMAPPED_UPPER, UNMAPPED_UPPER),
    Caller("gid_unmapped", U(1000), UNMAPPED_UPPER),
    Caller("container_root", userns=True),
]


# ---- the mount pair -------------------------------------------------------------
class MountPair:
    """Two lowers (``lower_s``, ``lower_k``) on the same filesystem, one
    served by shiftfs at ``mnt_s``, one by a kernel idmapped mount at
    ``mnt_k``, with the same table. Close with ``close()``."""

    def __init__(self, shiftfs_options=()):
        self.work = tempfile.mkdtemp(prefix="shiftfs-diff-")
        os.chmod(self.work, 0o755)
        self.lower_s, self.lower_k, self.mnt_s, self.mnt_k = (
            os.path.join(self.work, n) for n in ("lower_s", "lower_k", "mnt_s", "mnt_k"))
        for d in (self.lower_s, self.lower_k, self.mnt_s, self.mnt_k):
            os.mkdir(d, 0o755)
        self.count = 0
        self.documented: list[str] = []
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(mount(
                self.lower_s, self.mnt_s,
                uidmap=[Extent(*e) for e in UID_EXTENTS], gidmap=[Extent(*e) for e in GID_EXTENTS],
                options=list(shiftfs_options)))
            self._stack.enter_context(idmapped_mount(self.lower_k, self.mnt_k, UID_EXTENTS, GID_EXTENTS))
        except BaseException:
            self.close()
            raise

    def close(self):
        try:
            self._stack.close()
        finally:
            for mp in (self.mnt_s, self.mnt_k):  # last resort: never leave a mount behind
                if is_mounted(mp, None):
                    unmount(mp, lazy=True)
            shutil.rmtree(self.work, ignore_errors=True)

    def new_case(self, extra=None) -> tuple[str, str, str, str]:
        """(lower_s, lower_k, upper_s, upper_k) of a fresh case directory."""
        self.count += 1
        name = f"c{self.count}"
        for lower in (self.lower_s, self.lower_k):
            build_tree(os.path.join(lower, name), extra)
        return (os.path.join(self.lower_s, name), os.path.join(self.lower_k, name),
                os.path.join(self.mnt_s, name), os.path.join(self.mnt_k, name))

    def compare(self, op: Callable[[str], object], caller: Caller, extra=None,
                check_lower=True) -> list[str]:
        """Run ``op(case_dir_on_mount)`` as ``caller`` on both mounts; the
        rows in which they disagree (empty: they agree)."""
        lower_s, lower_k, upper_s, upper_k = self.new_case(extra)
        got_s = caller.run(op, upper_s)
        got_k = caller.run(op, upper_k)
        self.documented = []
        rows = diff_rows("", {"result": got_s}, {"result": got_k}, self.documented)
        snap_s, snap_k = lower_snapshot(lower_s), lower_snapshot(lower_k)
        if check_lower:
            rows += diff_rows("lower", snap_s, snap_k, self.documented)
        rels = sorted(set(snap_s) | set(snap_k))
        rows += diff_rows("upper", upper_snapshot(upper_s, rels), upper_snapshot(upper_k, rels),
                          self.documented)
        return rows

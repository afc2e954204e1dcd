"""shiftfs against a kernel idmapped mount, operation x caller.

Every case runs one operation as one caller on a shiftfs mount and on a
kernel idmapped bind mount of an identical lower tree with the same table
(see differential.py), and fails with the rows in which the two disagree:
the result or errno, what the mount shows afterwards, what the lower tree
holds afterwards. The kernel is the specification; the few places where a
FUSE daemon cannot match it are cases in KNOWN_DIFFERENCES, each of which
must still differ (so a fix shows up) and is described in docs/semantics.md (Differences from kernel idmapped mounts).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

import pytest

from shiftfs.daemon import handles_killpriv_v2

from tests.oracle.differential import (
    ACL_ACCESS, ACL_DEFAULT, CALLERS, CAPS, GROUP, GROUP_OBJ, MASK, OTHER, OVERFLOW_UID,
    UNMAPPED_UPPER, USER, USER_OBJ, MountPair, Up, acl, acl_text, cap_text, cap_v2, cap_v3, v)

pytestmark = pytest.mark.needs_root

J = os.path.join


# ---- operations: each takes the case directory on a mount, runs as the caller ----
def create(rel, mode=0o666):
    def op(b):
        os.close(os.open(J(b, rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        st = os.lstat(J(b, rel))
        return st.st_uid, st.st_gid, oct(st.st_mode)
    return op


def mkdir(rel, mode=0o777):
    def op(b):
        os.mkdir(J(b, rel), mode)
        st = os.lstat(J(b, rel))
        return st.st_uid, st.st_gid, oct(st.st_mode)
    return op


def mknod(rel, mode, dev=0):
    def op(b):
        os.mknod(J(b, rel), mode, dev)
        st = os.lstat(J(b, rel))
        return st.st_uid, st.st_gid, oct(st.st_mode)
    return op


def symlink(rel):
    def op(b):
        os.symlink("f", J(b, rel))
        st = os.lstat(J(b, rel))
        return st.st_uid, st.st_gid
    return op


def link(src, dst):
    return lambda b: os.link(J(b, src), J(b, dst))


def rename(src, dst, flags=0):
    if not flags:
        return lambda b: os.rename(J(b, src), J(b, dst))

    def op(b):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, J(b, src).encode(), -100, J(b, dst).encode(), flags):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return op


def chown(rel, uid, gid, follow=True):
    return lambda b: os.chown(J(b, rel), v(uid), v(gid), follow_symlinks=follow)


def chmod(rel, mode):
    def op(b):
        os.chmod(J(b, rel), mode)
        return oct(os.stat(J(b, rel)).st_mode)
    return op


def write(rel, data=b"more\n", flags=os.O_WRONLY | os.O_APPEND):
    def op(b):
        fd = os.open(J(b, rel), flags)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)
    return op


def truncate(rel, size=2):
    return lambda b: os.truncate(J(b, rel), size)


def ftruncate(rel, size=2):
    def op(b):
        fd = os.open(J(b, rel), os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return op


def utime(rel, times=None):
    return lambda b: os.utime(J(b, rel), times)


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def utime_ns(rel, atime_nsec, mtime_nsec):
    """utimensat with raw tv_nsec values (UTIME_NOW, UTIME_OMIT)."""
    def op(b):
        import ctypes

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
        times = (Timespec * 2)(Timespec(0, atime_nsec), Timespec(0, mtime_nsec))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.utimensat(-100, J(b, rel).encode(), times, 0):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return op


def read(rel):
    def op(b):
        with open(J(b, rel), "rb") as f:
            return f.read()
    return op


def unlink(rel):
    return lambda b: os.unlink(J(b, rel))


def rmdir(rel):
    return lambda b: os.rmdir(J(b, rel))


def stat_ids(*rels):
    def op(b):
        out = []
        for rel in rels:
            st = os.lstat(J(b, rel))
            out.append((rel, st.st_uid, st.st_gid, oct(st.st_mode)))
        return out
    return op


def listdir(rel):
    return lambda b: sorted(os.listdir(J(b, rel)))


def readlink(rel):
    return lambda b: os.readlink(J(b, rel))


def access(rel, mode):
    return lambda b: os.access(J(b, rel), mode)


def getxattr(rel, name):
    def op(b):
        value = os.getxattr(J(b, rel), name, follow_symlinks=False)
        if name in (ACL_ACCESS, ACL_DEFAULT):
            return acl_text(value)
        if name == CAPS:
            return cap_text(value)
        return value
    return op


def setxattr(rel, name, value):
    return lambda b: os.setxattr(J(b, rel), name, v(value), follow_symlinks=False)


def removexattr(rel, name):
    return lambda b: os.removexattr(J(b, rel), name, follow_symlinks=False)


def then(*ops):
    """Several steps; every step's result (or errno) is part of the result."""
    def op(b):
        out = []
        for step in ops:
            try:
                out.append(step(b))
            except OSError as e:
                out.append(("errno", errno.errorcode.get(e.errno, e.errno)))
        return out
    return op


def exec_id(rel):
    def op(b):
        r = subprocess.run([J(b, rel), "-u"], capture_output=True, text=True)
        return r.returncode, r.stdout.strip()
    return op


def with_id_binary(rel, mode, uid, gid):
    def extra(base):
        p = J(base, rel)
        shutil.copy(shutil.which("id"), p)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    return extra


def full_acl(uid_entry, gid_entry=None):
    """An access ACL naming these ids, built when the operation runs."""
    def value():
        entries = [(USER_OBJ, 6, 0), (USER, 6, v(uid_entry)), (GROUP_OBJ, 4, 0)]
        if gid_entry is not None:
            entries.append((GROUP, 4, v(gid_entry)))
        return acl(*entries, (MASK, 6, 0), (OTHER, 0, 0))
    return value


def dir_acl(uid_entry):
    return lambda: acl((USER_OBJ, 7, 0), (USER, 7, v(uid_entry)), (GROUP_OBJ, 5, 0),
                       (MASK, 7, 0), (OTHER, 5, 0))


def cap3(root, flags=1):
    return lambda: cap_v3(v(root), flags=flags)


# name -> (operation, optional extra tree builder)
OPS = {
    # stat of mapped, unmapped and edge ids
    "stat_ids": stat_ids("pub", "pub/f", "pub/root", "pub/fz", "pub/fzu", "pub/fzg", "pub/e1999",
                         "pub/e2000", "pub/e65534", "pub/e65535", "pub/emax", "pub/ln"),
    "listdir_frozen_dir": listdir("pub/fzd"),
    "read_acl_file": read("pub/acl"),
    # creating names
    "create": create("pub/new", 0o666),
    "create_sgid_dir": create("sgid/new", 0o2775),
    "create_in_frozen_dir": create("pub/fzd/new"),
    "create_in_priv": create("priv/new"),
    "mkdir": mkdir("pub/nd", 0o777),
    "mkdir_sgid_dir": mkdir("sgid/nd", 0o755),
    "mkdir_in_frozen_dir": mkdir("pub/fzd/nd"),
    "mknod_fifo": mknod("pub/nf", stat.S_IFIFO | 0o640),
    "mknod_chr": mknod("pub/nc", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    "mknod_reg_sgid_dir": mknod("sgid/nr", stat.S_IFREG | 0o2770),
    "symlink": symlink("pub/nl"),
    "symlink_in_frozen_dir": symlink("pub/fzd/nl"),
    "create_existing": create("pub/g"),
    "create_default_acl_dir": create("pub/dacl/new", 0o666),
    "mkdir_default_acl_dir": mkdir("pub/dacl/nd", 0o777),
    # links and renames
    "link": link("pub/g", "pub/lg"),
    "link_frozen": link("pub/fz", "pub/lfz"),
    "link_into_frozen_dir": link("pub/g", "pub/fzd/lg"),
    "rename": rename("pub/g", "pub/g2"),
    "rename_replace": rename("pub/g", "pub/f"),
    "rename_frozen": rename("pub/fz", "pub/fz2"),
    "rename_onto_frozen": rename("pub/g", "pub/fz"),
    "rename_out_of_frozen_dir": rename("pub/fzd/c", "pub/c"),
    "rename_dir": rename("pub/dacl", "pub/dacl2"),
    "rename_into_frozen_dir": rename("pub/g", "pub/fzd/g"),
    "rename_over_in_frozen_dir": rename("pub/g", "pub/fzd/c"),
    "rename_exchange": rename("pub/g", "pub/f", 2),
    "rename_noreplace": rename("pub/g", "pub/f", 1),
    # chown
    "chown_mapped": chown("pub/f", Up(1001), Up(1001)),
    "chgrp_member_group": chown("pub/mg", -1, Up(1500)),
    "chown_unmapped_uid": chown("pub/f", UNMAPPED_UPPER, -1),
    "chown_unmapped_gid": chown("pub/f", -1, UNMAPPED_UPPER),
    "chown_overflow": chown("pub/f", OVERFLOW_UID, -1),
    "chown_keep_suid": chown("pub/suid", -1, -1),
    "chown_suid_mapped": chown("pub/suid", Up(1000), Up(1000)),
    "chown_sgid_nx": chown("pub/sgid_nx", -1, -1),
    "chown_sgid_nx_uid": chown("pub/sgid_nx", Up(1000), -1),
    "chown_frozen_out": chown("pub/fz", Up(1000), Up(1000)),
    "chown_frozen_uid_only": chown("pub/fzu", Up(1000), -1),
    "chown_frozen_gid_only": chown("pub/fzu", -1, Up(1000)),
    "chown_frozen_keep": chown("pub/fz", -1, -1),
    "chown_frozen_suid_out": chown("pub/fzs", Up(1000), Up(1000)),
    "lchown_symlink": chown("pub/ln", Up(1001), Up(1001), follow=False),
    # chmod
    "chmod": chmod("pub/f", 0o600),
    "chmod_sgid_owner_group": chmod("pub/f", 0o2755),
    "chmod_sgid_nonmember": chmod("pub/og", 0o2755),
    "chmod_sgid_member": chmod("pub/mg", 0o2755),
    "chmod_frozen": chmod("pub/fz", 0o600),
    "chmod_frozen_gid": chmod("pub/fzg", 0o600),
    "chmod_acl_file": chmod("pub/acl", 0o600),
    # data and times
    "write": write("pub/g"),
    "write_own": write("pub/f"),
    "write_trunc_open": write("pub/g", b"x", os.O_WRONLY | os.O_TRUNC),
    "write_suid_file": write("pub/sw"),
    "write_cap_file": write("pub/cap2"),
    "write_sgid_nx_file": write("pub/sgw"),
    "write_frozen": write("pub/fz"),
    "write_frozen_gid": write("pub/fzg"),
    "read_frozen": read("pub/fz"),
    "truncate": truncate("pub/g"),
    "ftruncate": ftruncate("pub/g"),
    "truncate_frozen": truncate("pub/fz"),
    "utime_now": utime("pub/g"),
    "utime_set": utime("pub/f", (12345, 12345)),
    "utime_now_frozen": utime("pub/fz"),
    "utime_set_frozen": utime("pub/fz", (12345, 12345)),
    "utime_now_omit_frozen": utime_ns("pub/fz", UTIME_NOW, UTIME_OMIT),
    # removing names
    "unlink": unlink("pub/g"),
    "unlink_sticky_own": unlink("sticky/own"),
    "unlink_sticky_other": unlink("sticky/other"),
    "unlink_sticky_frozen": unlink("sticky/fz"),
    "unlink_frozen": unlink("pub/fz"),
    "unlink_in_frozen_dir": unlink("pub/fzd/c"),
    "rmdir_frozen": rmdir("pub/fze"),
    # plain xattrs
    "setxattr_user": setxattr("pub/f", "user.y", b"2"),
    "setxattr_user_frozen": setxattr("pub/fz", "user.y", b"2"),
    "removexattr_user": removexattr("pub/x", "user.x"),
    # POSIX ACLs
    "get_acl": getxattr("pub/acl", ACL_ACCESS),
    "get_default_acl": getxattr("pub/dacl", ACL_DEFAULT),
    "set_acl_mapped": setxattr("pub/f", ACL_ACCESS, full_acl(Up(1001), Up(1500))),
    "set_acl_unmapped": setxattr("pub/f", ACL_ACCESS, full_acl(UNMAPPED_UPPER)),
    "set_acl_frozen": setxattr("pub/fz", ACL_ACCESS, full_acl(Up(1001))),
    "set_default_acl": setxattr("priv", ACL_DEFAULT, dir_acl(Up(1001))),
    "set_default_acl_then_create": then(setxattr("pub/dacl", ACL_DEFAULT, dir_acl(Up(1500))),
                                        create("pub/dacl/n2")),
    "remove_acl": removexattr("pub/acl", ACL_ACCESS),
    "acl_enforced_write": write("pub/acl"),
    # file capabilities
    "get_cap_v2": getxattr("pub/cap2", CAPS),
    "get_cap_v3_root0": getxattr("pub/cap3_0", CAPS),
    "get_cap_v3_root1000": getxattr("pub/cap3_1000", CAPS),
    "get_cap_v3_unmapped": getxattr("pub/cap3_z", CAPS),
    "set_cap_v2": setxattr("pub/f", CAPS, cap_v2()),
    "set_cap_v3_base": setxattr("pub/f", CAPS, cap3(Up(0))),
    "set_cap_v3_mapped": setxattr("pub/f", CAPS, cap3(Up(1000))),
    "set_cap_v3_unmapped": setxattr("pub/f", CAPS, cap3(UNMAPPED_UPPER)),
    "set_cap_v3_flags": setxattr("pub/f", CAPS, cap3(Up(1000), flags=0x3)),
    "remove_cap": removexattr("pub/cap2", CAPS),
    "set_cap_frozen": setxattr("pub/fz", CAPS, cap3(Up(1000))),
    "get_acl_frozen": getxattr("pub/fzacl", ACL_ACCESS),
    # reading frozen inodes: only the other bits, the group bits for members
    # of a mapped group, and ACL entries count; capabilities do not override
    "read_frozen_600": read("pub/fzr"),
    "read_frozen_group": read("pub/fzgr"),
    "read_frozen_not_group": read("pub/fzgo"),
    "read_frozen_acl": read("pub/fzacl2"),
    "access_frozen_600": access("pub/fzr", os.R_OK),
    "listdir_frozen_700": listdir("pub/fzd7"),
    "listdir_frozen_711": listdir("pub/fzd71"),
    "listdir_frozen_755": listdir("pub/fzd75"),
    "listdir_frozen_group": listdir("pub/fzdg"),
    "stat_in_frozen_700": stat_ids("pub/fzd7/c"),
    "stat_in_frozen_711": stat_ids("pub/fzd71/c"),
    "stat_in_frozen_755": stat_ids("pub/fzd75/c"),
    "stat_in_frozen_group": stat_ids("pub/fzdg/c"),
    "read_in_frozen_700": read("pub/fzd7/c"),
    "read_in_frozen_711": read("pub/fzd71/c"),
    "readlink_frozen": readlink("pub/fzl"),
    "readlink_in_frozen_700": readlink("pub/fzd7/l"),
    "readlink_in_frozen_711": readlink("pub/fzd71/l"),
    "getxattr_user_frozen_600": getxattr("pub/fzr", "user.x"),
    "getxattr_user_frozen_group": getxattr("pub/fzgr", "user.x"),
    "getxattr_acl_frozen_600": getxattr("pub/fzr", ACL_ACCESS),
    "getxattr_in_frozen_700": getxattr("pub/fzd7/c", "user.x"),
    "stat_in_frozen_700_moved": then(stat_ids("pub/fzd7"), rename("pub", "pub2"),
                                     stat_ids("pub2/fzd7/c")),
    "chown_cap_file": chown("pub/cap3_1000", -1, -1),
}

EXEC_OPS = {
    # exec of set-uid files (shiftfs mounted with -o suid, as the kernel mount is)
    "exec_suid_root": (exec_id("pub/id"), with_id_binary("pub/id", 0o4755, 0, 0)),
    "exec_suid_user": (exec_id("pub/id"), with_id_binary("pub/id", 0o4755, 1000, 1000)),
    "exec_suid_frozen": (exec_id("pub/id"), with_id_binary("pub/id", 0o4755, 5000, 5000)),
    # exec of frozen files: the x bits of "other" (or of a mapped group) only
    "exec_frozen_700": (exec_id("pub/id"), with_id_binary("pub/id", 0o700, 5000, 5000)),
    "exec_frozen_711": (exec_id("pub/id"), with_id_binary("pub/id", 0o711, 5000, 5000)),
    "exec_frozen_group": (exec_id("pub/id"), with_id_binary("pub/id", 0o750, 5000, 1500)),
}

# (operation, caller) pairs where shiftfs cannot give the kernel's answer,
# by the difference in docs/semantics.md (Differences from kernel idmapped mounts) that explains it. Such a case
# must still differ, and only in the way its difference allows (see
# ALLOWED), so a fix or a new difference shows up.
UNPRIVILEGED = ("user", "member", "unmapped", "gid_unmapped")
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}
for _ops, _callers, _doc in [
    # D2: the FUSE client refuses before the daemon is asked
    (("chown_overflow", "chown_unmapped_uid"), UNPRIVILEGED, "D2"),
    (("chown_unmapped_gid",), ("user", "member", "unmapped"), "D2"),
    (("create_in_priv",), ("unmapped",), "D2"),
    (("mknod_chr",), ("unmapped", "gid_unmapped"), "D2"),
    (("create_in_frozen_dir", "mkdir_in_frozen_dir", "symlink_in_frozen_dir",
      "link_into_frozen_dir", "rename_into_frozen_dir"),
     ("host_root", "unmapped", "gid_unmapped"), "D2"),
    # D5: chown of a frozen set-id file by host root; gone where the daemon
    # clears set-id bits itself (FUSE_HANDLE_KILLPRIV_V2), and so decides
    (("chown_frozen_suid_out",), () if handles_killpriv_v2() else ("host_root",), "D5"),
]:
    for _op in _ops:
        for _caller in _callers:
            KNOWN_DIFFERENCES[(_op, _caller)] = _doc


def _only_errno_differs(rows, kernel_errno="EOVERFLOW"):
    """Both refused, the kernel with ``kernel_errno``; nothing else differs."""
    return (len(rows) == 1 and rows[0].startswith(" result: shiftfs=Errno(")
            and rows[0].endswith(f"kernel=Errno({kernel_errno})"))


ALLOWED = {
    "D2": _only_errno_differs,
    "D5": lambda rows: rows == [" result: shiftfs=Errno(EOVERFLOW) kernel=Errno(EPERM)"],
}


@pytest.fixture(scope="module")
def pair():
    p = MountPair(shiftfs_options=["-o", "suid"])
    try:
        yield p
    finally:
        p.close()


CASES = [(op, c) for op in list(OPS) + list(EXEC_OPS) for c in CALLERS]


@pytest.mark.parametrize("op_name,caller", CASES, ids=[f"{o}-{c.name}" for o, c in CASES])
def test_same_as_kernel(pair, op_name, caller):
    if op_name in OPS:
        op, extra = OPS[op_name], None
    else:
        op, extra = EXEC_OPS[op_name]
    rows = pair.compare(op, caller, extra)
    known = KNOWN_DIFFERENCES.get((op_name, caller.name))
    if known:
        assert rows, f"{op_name} as {caller.name} now agrees with the kernel; drop it from KNOWN_DIFFERENCES"
        assert ALLOWED[known](rows), (f"{op_name} as {caller.name} differs beyond {known}:\n  "
                                      + "\n  ".join(rows))
        return
    assert not rows, f"{op_name} as {caller.name}:\n  " + "\n  ".join(rows)


def test_case_count():
    assert len(CASES) >= 100
    assert all((op, c) in [(o, k.name) for o, k in CASES] for op, c in KNOWN_DIFFERENCES)

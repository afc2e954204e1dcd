"""shiftfs.policy as a table: the kernel's decisions for frozen inodes and
unmapped callers, without a mount. The expected errnos are the ones the
differential suite measured on a kernel idmapped mount
(tests/oracle/test_differential.py); the case names there are given."""

import errno
import os
import stat

import pytest

from shiftfs import policy
from shiftfs.idmap import Extent, IdTable

UIDS = IdTable([Extent(0, 100000, 2000)])
GIDS = IdTable([Extent(0, 100000, 2000)])
Z = 5000  # an unmapped lower id


def st(uid=1000, gid=1000, mode=stat.S_IFREG | 0o644):
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


MAPPED, FROZEN, FROZEN_U, FROZEN_G = st(), st(Z, Z), st(Z, 1000), st(1000, Z)
DIR, FROZEN_DIR = st(mode=stat.S_IFDIR | 0o777), st(Z, Z, stat.S_IFDIR | 0o777)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("inode,frozen", [(MAPPED, False), (FROZEN, True), (FROZEN_U, True),
                                          (FROZEN_G, True), (st(1999, 1999), False),
                                          (st(2000, 0), True), (st(0, 0xFFFFFFFE), True)])
def test_is_frozen(inode, frozen):
    assert policy.is_frozen(inode, UIDS, GIDS) is frozen


@pytest.mark.parametrize("what,expected", [
    ("write", errno.EACCES),      # write_frozen, truncate_frozen
    ("utimes", errno.EACCES),     # utime_now_frozen
    ("chmod", errno.EOVERFLOW),   # chmod_frozen-host_root, utime_set_frozen-host_root
    ("setxattr", errno.EPERM),    # setxattr_user_frozen, set_acl_frozen, set_cap_frozen
    ("unlink", errno.EOVERFLOW),  # unlink_frozen, rmdir_frozen
    ("rename", errno.EOVERFLOW),  # rename_frozen, rename_onto_frozen
    ("link", errno.EOVERFLOW),    # link_frozen
])
def test_check_modify(what, expected):
    for inode in (FROZEN, FROZEN_U, FROZEN_G):
        assert errno_of(policy.check_modify, inode, UIDS, GIDS, what) == expected
    assert errno_of(policy.check_modify, MAPPED, UIDS, GIDS, what) is None


def test_create_order():
    # create / mkdir / symlink in a frozen directory: an unmapped caller is
    # told EOVERFLOW first (create_in_frozen_dir-unmapped), a mapped one EACCES
    assert errno_of(policy.check_create, False, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_create, True, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_create, False, DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_create, True, DIR, UIDS, GIDS) is None


def test_delete_order():
    # unlink_frozen: the victim first; unlink_in_frozen_dir: then the directory
    assert errno_of(policy.check_delete, FROZEN, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_delete, MAPPED, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_delete, MAPPED, DIR, UIDS, GIDS) is None


def test_link_order():
    assert errno_of(policy.check_link, FROZEN, True, DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_link, MAPPED, False, FROZEN_DIR, UIDS, GIDS) == errno.EOVERFLOW
    assert errno_of(policy.check_link, MAPPED, True, FROZEN_DIR, UIDS, GIDS) == errno.EACCES
    assert errno_of(policy.check_link, MAPPED, True, DIR, UIDS, GIDS) is None


@pytest.mark.parametrize("old,old_dir,new,new_dir,caller_mapped,expected", [
    (MAPPED, DIR, None, DIR, True, None),                       # rename
    (MAPPED, DIR, None, DIR, False, errno.EOVERFLOW),           # rename-unmapped (new name)
    (MAPPED, DIR, MAPPED, DIR, False, None),                    # rename_replace-unmapped
    (FROZEN, DIR, None, DIR, True, errno.EOVERFLOW),            # rename_frozen
    (MAPPED, DIR, FROZEN, DIR, True, errno.EOVERFLOW),          # rename_onto_frozen
    (MAPPED, FROZEN_DIR, None, DIR, True, errno.EACCES),        # rename_out_of_frozen_dir
    (MAPPED, DIR, None, FROZEN_DIR, True, errno.EACCES),        # rename_into_frozen_dir
    (MAPPED, DIR, None, FROZEN_DIR, False, errno.EOVERFLOW),    # ...-unmapped
    (MAPPED, DIR, MAPPED, FROZEN_DIR, True, errno.EACCES),      # rename_over_in_frozen_dir
])
def test_check_rename(old, old_dir, new, new_dir, caller_mapped, expected):
    assert errno_of(policy.check_rename, old, old_dir, new, new_dir, caller_mapped,
                    UIDS, GIDS) == expected


@pytest.mark.parametrize("atime,mtime,kind", [
    (None, None, "utimes"),
    (policy.UTIME_NOW, policy.UTIME_NOW, "utimes"),      # utime_now_frozen: EACCES
    (policy.UTIME_NOW, policy.UTIME_OMIT, "chmod"),      # utime_now_omit_frozen: EOVERFLOW
    (5, 6, "chmod"),                                      # utime_set_frozen: EOVERFLOW
])
def test_utimes_kind(atime, mtime, kind):
    assert policy.utimes_kind(atime, mtime) == kind


@pytest.mark.parametrize("inode,caller,new_uid,new_gid,expected", [
    (FROZEN, 0, 1000, 1000, None),                  # chown_frozen_out-host_root
    (FROZEN_U, 0, 1000, -1, None),                  # chown_frozen_uid_only-host_root
    (FROZEN_U, 0, -1, 1000, errno.EOVERFLOW),       # chown_frozen_gid_only-host_root
    (FROZEN, 0, -1, -1, errno.EOVERFLOW),           # (D3: never reaches the daemon)
    (FROZEN_G, 0, 1000, -1, errno.EOVERFLOW),
    (FROZEN, 100000, 1000, 1000, errno.EOVERFLOW),  # only host root may unfreeze
    (MAPPED, 100000, 1001, -1, None),
])
def test_check_chown(inode, caller, new_uid, new_gid, expected):
    assert errno_of(policy.check_chown, inode, UIDS, GIDS, caller, new_uid, new_gid) == expected


@pytest.mark.parametrize("mode,in_group,capable,drops", [
    (stat.S_IFREG | 0o2644, False, False, True),    # chown_sgid_nx_uid-gid_unmapped
    (stat.S_IFREG | 0o2644, True, False, False),
    (stat.S_IFREG | 0o2644, False, True, False),
    (stat.S_IFREG | 0o2754, False, False, False),   # with group exec the FUSE client does it
    (stat.S_IFREG | 0o644, False, False, False),
    (stat.S_IFDIR | 0o2755, False, False, False),   # directories keep S_ISGID on chown
])
def test_chown_drops_sgid(mode, in_group, capable, drops):
    assert policy.chown_drops_sgid(st(mode=mode), in_group, capable) is drops


def test_proc_parsers():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000000010\n"
    assert policy.parse_cap_eff(status) == 0x10
    assert policy.parse_cap_eff("Name: x\n") == 0
    uid_map = "         0     100000       2000\n      5000       4000          1\n"
    assert policy.id_in_map(uid_map, 100000) and policy.id_in_map(uid_map, 101999)
    assert policy.id_in_map(uid_map, 4000)
    assert not policy.id_in_map(uid_map, 102000) and not policy.id_in_map(uid_map, 0)


# ---- reading, listing, searching, exec of frozen inodes -------------------------
R, W, X = policy.MAY_READ, policy.MAY_WRITE, policy.MAY_EXEC
ROOT, USER, MEMBER, UNMAPPED, CROOT = 0, 101000, 101001, 4242, 100000
GROUPS = {ROOT: {0}, USER: {USER}, MEMBER: {MEMBER, 101500}, UNMAPPED: {UNMAPPED},
          CROOT: {100000}}


def acl_value(*entries):
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


FZACL2 = acl_value((0x01, 6, 0), (0x02, 4, 1001), (0x04, 0, 0), (0x10, 4, 0), (0x20, 0, 0))


@pytest.mark.parametrize("inode,acl,want,allowed", [
    # read_frozen_600: the owner class never applies (owner unmapped), no capability
    (st(Z, Z, stat.S_IFREG | 0o600), None, R, ()),
    # read_frozen_group: the group bits for members of the mapped group only
    (st(Z, 1500, stat.S_IFREG | 0o640), None, R, (MEMBER,)),
    # read_frozen_not_group: members get the group bits even when other allows more
    (st(Z, 1500, stat.S_IFREG | 0o604), None, R, (ROOT, USER, UNMAPPED, CROOT)),
    # read_frozen_acl: a named-user entry for the mapped id, within the mask
    (st(Z, Z, stat.S_IFREG | 0o640), FZACL2, R, (MEMBER,)),
    (st(Z, Z, stat.S_IFREG | 0o640), FZACL2, W, ()),
    # an entry naming an unmapped id matches no one
    (st(Z, Z, stat.S_IFREG | 0o640), acl_value((0x01, 6, 0), (0x02, 4, Z), (0x04, 0, 0),
                                               (0x10, 4, 0), (0x20, 0, 0)), R, ()),
    # a named group entry (member's 1500); the mask limits it
    (st(Z, Z, stat.S_IFREG | 0o640), acl_value((0x01, 6, 0), (0x04, 0, 0), (0x08, 6, 1500),
                                               (0x10, 4, 0), (0x20, 0, 0)), R, (MEMBER,)),
    (st(Z, Z, stat.S_IFREG | 0o640), acl_value((0x01, 6, 0), (0x04, 0, 0), (0x08, 6, 1500),
                                               (0x10, 4, 0), (0x20, 0, 0)), W, ()),
    # in a matching group entry without the bits: refused even if other has them
    (st(Z, 1500, stat.S_IFREG | 0o604), acl_value((0x01, 6, 0), (0x04, 0, 0), (0x20, 4, 0)),
     R, (ROOT, USER, UNMAPPED, CROOT)),
    # a value that is not an ACL: the mode bits decide
    (st(Z, 1500, stat.S_IFREG | 0o640), b"junk", R, (MEMBER,)),
    # the owner class does apply when the owner is mapped (group unmapped)
    (st(1000, Z, stat.S_IFREG | 0o600), None, R, (USER,)),
    # listdir_frozen_700/711/755/group, stat_in_frozen_700/711/755/group
    (st(Z, Z, stat.S_IFDIR | 0o700), None, R, ()),
    (st(Z, Z, stat.S_IFDIR | 0o700), None, X, ()),
    (st(Z, Z, stat.S_IFDIR | 0o711), None, R, ()),
    (st(Z, Z, stat.S_IFDIR | 0o711), None, X, (ROOT, USER, MEMBER, UNMAPPED, CROOT)),
    (st(Z, Z, stat.S_IFDIR | 0o755), None, R, (ROOT, USER, MEMBER, UNMAPPED, CROOT)),
    (st(Z, 1500, stat.S_IFDIR | 0o750), None, R | X, (MEMBER,)),
    # exec_frozen_700/711/group
    (st(Z, Z, stat.S_IFREG | 0o700), None, X, ()),
    (st(Z, Z, stat.S_IFREG | 0o711), None, X, (ROOT, USER, MEMBER, UNMAPPED, CROOT)),
    (st(Z, 1500, stat.S_IFREG | 0o750), None, X, (MEMBER,)),
])
def test_frozen_permitted(inode, acl, want, allowed):
    for caller, groups in GROUPS.items():
        assert policy.frozen_permitted(inode, UIDS, GIDS, caller, groups, want, acl) is (
            caller in allowed), caller


@pytest.mark.parametrize("flags,want", [
    (os.O_RDONLY, policy.MAY_READ),
    (os.O_RDONLY | os.O_LARGEFILE | policy.FMODE_EXEC, policy.MAY_EXEC),  # execve's open
    (os.O_WRONLY, policy.MAY_WRITE),
    (os.O_RDWR, policy.MAY_READ | policy.MAY_WRITE),
])
def test_open_want(flags, want):
    assert policy.open_want(flags) == want


@pytest.mark.parametrize("name,checks", [
    (b"user.x", True), ("user.x", True), (b"system.posix_acl_access", False),
    (b"security.capability", False), (b"trusted.overlay.opaque", False),
])
def test_xattr_read_needs_permission(name, checks):
    assert policy.xattr_read_needs_permission(name) is checks


@pytest.mark.parametrize("mode,keep,left", [
    (0o4755, False, 0o755), (0o6777, True, 0o777), (0o6777, False, 0o777),
    (0o2745, True, 0o2745), (0o2745, False, 0o745), (0o2755, True, 0o755), (0o644, False, 0o644),
])
def test_killed_suidgid_mode(mode, keep, left):
    """setattr_should_drop_suidgid for a caller without CAP_FSETID."""
    assert policy.killed_suidgid_mode(mode, keep) == left


@pytest.mark.parametrize("mode, cleared", [
    (0o4755, True), (0o4644, True), (0o2755, True), (0o6777, True),
    (0o2745, False), (0o2645, False), (0o755, False), (0o1777, False),
])
def test_setid_always_cleared(mode, cleared):
    """should_remove_suid: set-uid always, set-gid only with group exec."""
    assert policy.setid_always_cleared(mode) is cleared
